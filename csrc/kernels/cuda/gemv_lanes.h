// What one lane of a warp computes in the decode GEMV (gemv.cu): its share of one row of W (K
// weights in a format) times x (up to T tokens), dequantizing the weights in registers. One
// header for the device and for the CPU: gemv_emulated (reference.cpp) runs the same code for
// each of a warp's 32 lanes, so the tests check the kernel's indexing without a GPU.
//
// A warp takes one row. Block formats: each block is split in `pieces`; lane l takes piece
// l % pieces of blocks l / pieces, l / pieces + 32 / pieces, ... so that the warp reads 32 /
// pieces consecutive blocks (whole, in order) per step:
//   q8_0, q4_0, q4_1, q5_0, q5_1   4 pieces of 8 weights (8 blocks, 144 to 272 bytes a step)
//   q4_k, q5_k, q6_k               16 pieces of 16 weights (2 blocks, 288 to 420 bytes a step)
// and a piece's weights come in runs of 4 consecutive ones, each against a float4 of x. Float
// formats: lane l takes 16 bytes at a time (4 f32, 8 f16 or bf16) at l, l + 32, ... when K allows
// aligned vectors, else single weights.
//
// Dequantization rounds each multiply and add as fm::quant::dequantize does (no fused
// multiply-add: __fmul_rn, __fadd_rn), so the weights are bit-exact with the CPU's; only the
// f32 sums differ from the references' (double).
//
// Alignment: with W's first byte 16-byte aligned (the launcher checks W and x), and rows made of
// whole blocks, every block is 2-byte aligned (q8_0, q4_0, q5_0, q6_k: 34, 18, 22, 210 bytes:
// loads of 16 bits), 4-byte (q4_1, q5_1: 20, 24) or 16-byte (q4_k, q5_k: 144, 176); float rows
// are 16-byte aligned where they take vectors (K a multiple of 4 or 8), and so are x's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"
#include "core/format.h"
#include "kernels/quant/blocks.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif
#if defined(__CUDA_ARCH__)  // the device pass only: the host compiler knows no such pragma
#define FM_UNROLL _Pragma("unroll")
#else
#define FM_UNROLL
#endif

namespace fm::cuda::lanes {

// ---- loads: one typed load of a whole T on the device (p aligned to T), memcpy on the CPU ----
struct alignas(8) U2 { uint32_t x, y; };
struct alignas(16) U4 { uint32_t x, y, z, w; };
struct alignas(16) F4 { float x, y, z, w; };
template <typename T>
FM_HD T load(const void* p) {
#ifdef __CUDA_ARCH__
    return *reinterpret_cast<const T*>(p);
#else
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
#endif
}
FM_HD uint32_t ld16(const uint8_t* p) { return load<uint16_t>(p); }                 // 2-byte aligned
FM_HD uint32_t ld32_a2(const uint8_t* p) { return ld16(p) | (ld16(p + 2) << 16); }  // 2-byte aligned
FM_HD uint32_t ld32(const uint8_t* p) { return load<uint32_t>(p); }                 // 4-byte aligned

// ---- conversions and rounded arithmetic ----
FM_HD float half_to_float(uint32_t bits) {  // the low 16 bits
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xFFFF)));
#else
    return f16_to_f32(uint16_t(bits & 0xFFFF));
#endif
}
FM_HD float bfloat_to_float(uint32_t bits) {  // the low 16 bits
#ifdef __CUDA_ARCH__
    return __uint_as_float((bits & 0xFFFF) << 16);
#else
    return bf16_to_f32(uint16_t(bits & 0xFFFF));
#endif
}
FM_HD float as_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}
FM_HD float f16_or_bf16(bool f16, uint32_t bits) { return f16 ? half_to_float(bits) : bfloat_to_float(bits); }
FM_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
FM_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
FM_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// byte k (0..3) of u; its low and high nibbles; as int8
FM_HD uint32_t byte_of(uint32_t u, int k) { return (u >> (8 * k)) & 0xFF; }
FM_HD int lo4(uint32_t u, int k) { return int((u >> (8 * k)) & 0xF); }
FM_HD int hi4(uint32_t u, int k) { return int((u >> (8 * k + 4)) & 0xF); }
FM_HD int s8(uint32_t u, int k) { return int(int8_t(uint8_t(byte_of(u, k)))); }

// ---- the running sums of up to T tokens ----
template <int T>
struct Acc {
    float v[T];
    int nt;      // tokens in use (<= T)
    size_t ldx;  // floats between tokens' rows of x
    FM_HD Acc(int n_tokens, size_t ld) : nt(n_tokens), ldx(ld) {
        FM_UNROLL
        for (int t = 0; t < T; ++t) v[t] = 0.f;
    }
    // four consecutive weights against x[0..3] of each token (x 16-byte aligned)
    FM_HD void quad(const float* x, float w0, float w1, float w2, float w3) {
        FM_UNROLL
        for (int t = 0; t < T; ++t)
            if (t < nt) {
                const F4 a = load<F4>(x + t * ldx);
                v[t] += w0 * a.x + w1 * a.y + w2 * a.z + w3 * a.w;
            }
    }
    FM_HD void one(const float* x, float w) {
        FM_UNROLL
        for (int t = 0; t < T; ++t)
            if (t < nt) v[t] += w * x[t * ldx];
    }
};

// ---- block layouts (blocks.h), pieces per block ----
template <Format F> struct Layout;
template <> struct Layout<Format::F32> { static constexpr int block = 1, bytes = 4, pieces = 1; };
template <> struct Layout<Format::F16> { static constexpr int block = 1, bytes = 2, pieces = 1; };
template <> struct Layout<Format::BF16> { static constexpr int block = 1, bytes = 2, pieces = 1; };
template <> struct Layout<Format::Q8_0> { static constexpr int block = 32, bytes = 34, pieces = 4; };
template <> struct Layout<Format::Q4_0> { static constexpr int block = 32, bytes = 18, pieces = 4; };
template <> struct Layout<Format::Q4_1> { static constexpr int block = 32, bytes = 20, pieces = 4; };
template <> struct Layout<Format::Q5_0> { static constexpr int block = 32, bytes = 22, pieces = 4; };
template <> struct Layout<Format::Q5_1> { static constexpr int block = 32, bytes = 24, pieces = 4; };
template <> struct Layout<Format::Q4_K> { static constexpr int block = 256, bytes = 144, pieces = 16; };
template <> struct Layout<Format::Q5_K> { static constexpr int block = 256, bytes = 176, pieces = 16; };
template <> struct Layout<Format::Q6_K> { static constexpr int block = 256, bytes = 210, pieces = 16; };
static_assert(Layout<Format::Q8_0>::bytes == sizeof(quant::BlockQ8_0) && Layout<Format::Q4_0>::bytes ==
              sizeof(quant::BlockQ4_0) && Layout<Format::Q4_1>::bytes == sizeof(quant::BlockQ4_1), "layout");
static_assert(Layout<Format::Q5_0>::bytes == sizeof(quant::BlockQ5_0) && Layout<Format::Q5_1>::bytes ==
              sizeof(quant::BlockQ5_1), "layout");
static_assert(Layout<Format::Q4_K>::bytes == sizeof(quant::BlockQ4_K) && Layout<Format::Q5_K>::bytes ==
              sizeof(quant::BlockQ5_K) && Layout<Format::Q6_K>::bytes == sizeof(quant::BlockQ6_K), "layout");

// Whether the float formats' rows take 16-byte vectors: K a multiple of 4 (f32) or 8 (f16, bf16).
inline bool float_vectors(Format f, int K) { return K % (f == Format::F32 ? 4 : 8) == 0; }

// ---- one piece of a block: b = the block's bytes, x = its first activation (token 0) ----

// q8_0: d (f16), qs[32] int8; x = d * q. Piece p: weights [8p, 8p + 8).
template <int T>
FM_HD void piece_q8_0(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const float d = half_to_float(ld16(b));
    const uint32_t u0 = ld32_a2(b + 2 + 8 * p), u1 = ld32_a2(b + 2 + 8 * p + 4);
    a.quad(x + 8 * p, mul_rn(float(s8(u0, 0)), d), mul_rn(float(s8(u0, 1)), d), mul_rn(float(s8(u0, 2)), d),
           mul_rn(float(s8(u0, 3)), d));
    a.quad(x + 8 * p + 4, mul_rn(float(s8(u1, 0)), d), mul_rn(float(s8(u1, 1)), d), mul_rn(float(s8(u1, 2)), d),
           mul_rn(float(s8(u1, 3)), d));
}

// q4_0: d, qs[16]; byte j: weight j (low nibble), j + 16 (high); x = d * (q - 8). Piece p: bytes
// [4p, 4p + 4), weights [4p, 4p + 4) and [16 + 4p, 16 + 4p + 4).
FM_HD float w_q4_0(float d, int q) { return mul_rn(d, float(q - 8)); }
template <int T>
FM_HD void piece_q4_0(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const float d = half_to_float(ld16(b));
    const uint32_t u = ld32_a2(b + 2 + 4 * p);
    a.quad(x + 4 * p, w_q4_0(d, lo4(u, 0)), w_q4_0(d, lo4(u, 1)), w_q4_0(d, lo4(u, 2)), w_q4_0(d, lo4(u, 3)));
    a.quad(x + 16 + 4 * p, w_q4_0(d, hi4(u, 0)), w_q4_0(d, hi4(u, 1)), w_q4_0(d, hi4(u, 2)), w_q4_0(d, hi4(u, 3)));
}

// q4_1: d, m, qs[16] as q4_0; x = d * q + m.
FM_HD float w_dm(float d, float m, int q) { return add_rn(mul_rn(d, float(q)), m); }
template <int T>
FM_HD void piece_q4_1(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const uint32_t dm = ld32(b);
    const float d = half_to_float(dm), m = half_to_float(dm >> 16);
    const uint32_t u = ld32(b + 4 + 4 * p);
    a.quad(x + 4 * p, w_dm(d, m, lo4(u, 0)), w_dm(d, m, lo4(u, 1)), w_dm(d, m, lo4(u, 2)), w_dm(d, m, lo4(u, 3)));
    a.quad(x + 16 + 4 * p, w_dm(d, m, hi4(u, 0)), w_dm(d, m, hi4(u, 1)), w_dm(d, m, hi4(u, 2)),
           w_dm(d, m, hi4(u, 3)));
}

// q5_0: d, qh (32 bits: bit i is weight i's fifth), qs[16] as q4_0; x = d * (q - 16).
// q5_1: d, m, qh, qs; x = d * q + m. The weights of piece p are those of q4_0's piece p.
FM_HD int q5(int nibble, uint32_t qh, int i) { return nibble | int(((qh >> i) & 1) << 4); }
FM_HD float w_q5_0(float d, int q) { return mul_rn(d, float(q - 16)); }
template <int T>
FM_HD void piece_q5_0(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const float d = half_to_float(ld16(b));
    const uint32_t qh = ld32_a2(b + 2), u = ld32_a2(b + 6 + 4 * p);
    const int i = 4 * p;
    a.quad(x + i, w_q5_0(d, q5(lo4(u, 0), qh, i)), w_q5_0(d, q5(lo4(u, 1), qh, i + 1)),
           w_q5_0(d, q5(lo4(u, 2), qh, i + 2)), w_q5_0(d, q5(lo4(u, 3), qh, i + 3)));
    a.quad(x + 16 + i, w_q5_0(d, q5(hi4(u, 0), qh, 16 + i)), w_q5_0(d, q5(hi4(u, 1), qh, 17 + i)),
           w_q5_0(d, q5(hi4(u, 2), qh, 18 + i)), w_q5_0(d, q5(hi4(u, 3), qh, 19 + i)));
}
template <int T>
FM_HD void piece_q5_1(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const uint32_t dm = ld32(b);
    const float d = half_to_float(dm), m = half_to_float(dm >> 16);
    const uint32_t qh = ld32(b + 4), u = ld32(b + 8 + 4 * p);
    const int i = 4 * p;
    a.quad(x + i, w_dm(d, m, q5(lo4(u, 0), qh, i)), w_dm(d, m, q5(lo4(u, 1), qh, i + 1)),
           w_dm(d, m, q5(lo4(u, 2), qh, i + 2)), w_dm(d, m, q5(lo4(u, 3), qh, i + 3)));
    a.quad(x + 16 + i, w_dm(d, m, q5(hi4(u, 0), qh, 16 + i)), w_dm(d, m, q5(hi4(u, 1), qh, 17 + i)),
           w_dm(d, m, q5(hi4(u, 2), qh, 18 + i)), w_dm(d, m, q5(hi4(u, 3), qh, 19 + i)));
}

// q4_k / q5_k scales: byte i of scales[12] (held as three words), and unpack_scale_min
// (blocks.h) of sub-block s.
FM_HD uint32_t scale_byte(uint32_t s0, uint32_t s1, uint32_t s2, int i) {
    return byte_of(i < 4 ? s0 : i < 8 ? s1 : s2, i & 3);
}
FM_HD void scale_min(uint32_t s0, uint32_t s1, uint32_t s2, int s, int& sc, int& mn) {
    if (s < 4) {
        sc = int(scale_byte(s0, s1, s2, s) & 63);
        mn = int(scale_byte(s0, s1, s2, s + 4) & 63);
    } else {
        sc = int((scale_byte(s0, s1, s2, s + 4) & 0xF) | ((scale_byte(s0, s1, s2, s - 4) >> 6) << 4));
        mn = int((scale_byte(s0, s1, s2, s + 4) >> 4) | ((scale_byte(s0, s1, s2, s) >> 6) << 4));
    }
}
// x = (d * sc) * q - dmin * mn, as fm::quant::dequantize rounds it
FM_HD float w_k(float ds, float dm, int q) { return sub_rn(mul_rn(ds, float(q)), dm); }

// q4_k: d, dmin, scales[12], qs[128]: 8 sub-blocks of 32; bytes [32j, 32j + 32) of qs hold
// sub-block 2j in their low nibbles and 2j + 1 in the high ones. q5_k: d, dmin, scales[12],
// qh[32], qs[128]; bit s of qh[l] is weight l of sub-block s's fifth bit.
// Piece p: j = p / 4, l0 = 8 (p % 4): qs bytes [32j + l0, +8), i.e. weights l0..l0 + 7 of
// sub-blocks 2j (64j + l0 + k) and 2j + 1 (64j + 32 + l0 + k).
template <int T, bool Q5>
FM_HD void piece_qk(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const uint32_t dd = ld32(b);
    const float d = half_to_float(dd), dmin = half_to_float(dd >> 16);
    const uint32_t s0 = ld32(b + 4), s1 = ld32(b + 8), s2 = ld32(b + 12);
    const int j = p >> 2, l0 = 8 * (p & 3);
    int sc0, mn0, sc1, mn1;
    scale_min(s0, s1, s2, 2 * j, sc0, mn0);
    scale_min(s0, s1, s2, 2 * j + 1, sc1, mn1);
    const float ds0 = mul_rn(d, float(sc0)), dm0 = mul_rn(dmin, float(mn0));
    const float ds1 = mul_rn(d, float(sc1)), dm1 = mul_rn(dmin, float(mn1));
    const U2 q = load<U2>(b + (Q5 ? 48 : 16) + 32 * j + l0);
    int lo[8], hi[8];
    FM_UNROLL
    for (int k = 0; k < 4; ++k) {
        lo[k] = lo4(q.x, k), lo[k + 4] = lo4(q.y, k);
        hi[k] = hi4(q.x, k), hi[k + 4] = hi4(q.y, k);
    }
    if (Q5) {
        const U2 h = load<U2>(b + 16 + l0);  // qh[l0 .. l0 + 8)
        FM_UNROLL
        for (int k = 0; k < 8; ++k) {
            const uint32_t hb = byte_of(k < 4 ? h.x : h.y, k & 3);
            lo[k] |= int(((hb >> (2 * j)) & 1) << 4);
            hi[k] |= int(((hb >> (2 * j + 1)) & 1) << 4);
        }
    }
    const float* xl = x + 64 * j + l0;  // sub-block 2j's weights l0..; 2j + 1's 32 further
    a.quad(xl, w_k(ds0, dm0, lo[0]), w_k(ds0, dm0, lo[1]), w_k(ds0, dm0, lo[2]), w_k(ds0, dm0, lo[3]));
    a.quad(xl + 4, w_k(ds0, dm0, lo[4]), w_k(ds0, dm0, lo[5]), w_k(ds0, dm0, lo[6]), w_k(ds0, dm0, lo[7]));
    a.quad(xl + 32, w_k(ds1, dm1, hi[0]), w_k(ds1, dm1, hi[1]), w_k(ds1, dm1, hi[2]), w_k(ds1, dm1, hi[3]));
    a.quad(xl + 36, w_k(ds1, dm1, hi[4]), w_k(ds1, dm1, hi[5]), w_k(ds1, dm1, hi[6]), w_k(ds1, dm1, hi[7]));
}

// q6_k: ql[128], qh[64], scales[16] (int8), d; 16 sub-blocks of 16: x = (d * sc[i / 16]) * (q - 32).
// Per half (128 weights: ql + 64 half, qh + 32 half), weight 32k + l (k = 0..3, l = 0..31) has
// its low 4 bits in ql[l + 32 (k & 1)] (low nibble for k < 2, else high) and its high 2 in bits
// 2k, 2k + 1 of qh[l]. Piece p: half = p / 8, l0 = 4 (p % 8): l in [l0, l0 + 4) for k = 0..3.
template <int T>
FM_HD void piece_q6_k(const uint8_t* b, int p, const float* x, Acc<T>& a) {
    const int half = p >> 3, l0 = 4 * (p & 7);
    const float d = half_to_float(ld16(b + 208));
    const uint32_t ql0 = ld32_a2(b + 64 * half + l0);       // k = 0 (low nibbles), 2 (high)
    const uint32_t ql1 = ld32_a2(b + 64 * half + 32 + l0);  // k = 1, 3
    const uint32_t qh = ld32_a2(b + 128 + 32 * half + l0);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * half + (l0 >> 4));  // sc[2k]: run k's scale
    FM_UNROLL
    for (int k = 0; k < 4; ++k) {
        const uint32_t qlk = (k & 1) ? ql1 : ql0;
        const float ds = mul_rn(d, float(sc[2 * k]));
        float w[4];
        FM_UNROLL
        for (int i = 0; i < 4; ++i) {
            const int low = (k >> 1) ? hi4(qlk, i) : lo4(qlk, i);
            const int q = (low | int(((byte_of(qh, i) >> (2 * k)) & 3) << 4)) - 32;
            w[i] = mul_rn(ds, float(q));
        }
        a.quad(x + 128 * half + 32 * k + l0, w[0], w[1], w[2], w[3]);
    }
}

// ---- a lane's share of a row: w = the row's bytes, x = token 0's activations ----
template <Format F, int T>
FM_HD void gemv_lane(const uint8_t* w, const float* x, int K, int lane, bool vectors, Acc<T>& a) {
    using L = Layout<F>;
    if constexpr (F == Format::F32 || F == Format::F16 || F == Format::BF16) {
        if (vectors) {
            constexpr int V = F == Format::F32 ? 4 : 8;  // weights per 16 bytes
            for (int k = V * lane; k < K; k += 32 * V) {
                const U4 u = load<U4>(w + size_t(k) * L::bytes);
                if constexpr (F == Format::F32) {
                    a.quad(x + k, as_float(u.x), as_float(u.y), as_float(u.z), as_float(u.w));
                } else {
                    constexpr bool h = F == Format::F16;
                    a.quad(x + k, f16_or_bf16(h, u.x), f16_or_bf16(h, u.x >> 16), f16_or_bf16(h, u.y),
                           f16_or_bf16(h, u.y >> 16));
                    a.quad(x + k + 4, f16_or_bf16(h, u.z), f16_or_bf16(h, u.z >> 16), f16_or_bf16(h, u.w),
                           f16_or_bf16(h, u.w >> 16));
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const uint8_t* p = w + size_t(k) * L::bytes;
                float v;
                if constexpr (F == Format::F32) v = as_float(ld32(p));
                else if constexpr (F == Format::F16) v = half_to_float(ld16(p));
                else v = bfloat_to_float(ld16(p));
                a.one(x + k, v);
            }
        }
    } else {
        constexpr int P = L::pieces, step = 32 / P;  // blocks a warp takes per step
        const int nb = K / L::block, piece = lane % P;
        for (int blk = lane / P; blk < nb; blk += step) {
            const uint8_t* b = w + size_t(blk) * L::bytes;
            const float* xb = x + size_t(blk) * L::block;
            if constexpr (F == Format::Q8_0) piece_q8_0(b, piece, xb, a);
            else if constexpr (F == Format::Q4_0) piece_q4_0(b, piece, xb, a);
            else if constexpr (F == Format::Q4_1) piece_q4_1(b, piece, xb, a);
            else if constexpr (F == Format::Q5_0) piece_q5_0(b, piece, xb, a);
            else if constexpr (F == Format::Q5_1) piece_q5_1(b, piece, xb, a);
            else if constexpr (F == Format::Q4_K) piece_qk<T, false>(b, piece, xb, a);
            else if constexpr (F == Format::Q5_K) piece_qk<T, true>(b, piece, xb, a);
            else piece_q6_k(b, piece, xb, a);
        }
    }
}

// Calls fn(std::integral_constant<Format, f>{}) (host code: picks a kernel's instance).
template <class Fn>
void with_format(Format f, Fn&& fn) {
    using std::integral_constant;
    switch (f) {
        case Format::F32: return fn(integral_constant<Format, Format::F32>{});
        case Format::F16: return fn(integral_constant<Format, Format::F16>{});
        case Format::BF16: return fn(integral_constant<Format, Format::BF16>{});
        case Format::Q8_0: return fn(integral_constant<Format, Format::Q8_0>{});
        case Format::Q4_0: return fn(integral_constant<Format, Format::Q4_0>{});
        case Format::Q4_1: return fn(integral_constant<Format, Format::Q4_1>{});
        case Format::Q5_0: return fn(integral_constant<Format, Format::Q5_0>{});
        case Format::Q5_1: return fn(integral_constant<Format, Format::Q5_1>{});
        case Format::Q4_K: return fn(integral_constant<Format, Format::Q4_K>{});
        case Format::Q5_K: return fn(integral_constant<Format, Format::Q5_K>{});
        case Format::Q6_K: return fn(integral_constant<Format, Format::Q6_K>{});
    }
    FM_ARG(false, "unknown format id ", int(f));
}

}  // namespace fm::cuda::lanes
