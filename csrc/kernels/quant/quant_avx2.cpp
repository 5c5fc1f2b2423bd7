// AVX2 kernels for the block formats (quant.h): activations quantized to int8 blocks of 32,
// weights unpacked to bytes, products summed by maddubs (u8 x s8 -> s16 pairs) and madd (-> s32),
// then scaled in f32 once per block. Offsets and mins go through the activation sums.
// Compiled with -mavx2 -mfma -mf16c -ffp-contract=off.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/quant/quant.h"

namespace fm::quant {

namespace {

inline float f16(uint16_t h) { return _cvtsh_ss(h); }
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Sum of u[i] * s[i] over pairs, then pairs of pairs: 8 int32 lanes. u unsigned, s signed.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// 16 bytes of nibbles -> 32 bytes: the low nibbles (weights 0..15), then the high ones (16..31).
inline __m256i nibbles(const uint8_t* qs) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// Byte i = 0x10 where bit i of the 32 bits at p is set (the fifth bit of q5_0 and q5_1 weights).
inline __m256i fifth_bits(const uint8_t* p) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of the bits
        _mm256_set1_epi32(int(bits)), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                                       2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte i -> 1 << (i % 8)
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// (v >> shift) & mask in every byte (AVX2 has no byte shifts; the mask drops what crosses bytes).
inline __m256i byte_bits(__m256i v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(char(mask)));
}

// The dot product of one row of K weights with one token's activation blocks.
template <Format F>
float row_dot(const uint8_t* w, const ActBlock* a, int K) {
    __m256 acc = _mm256_setzero_ps();
    float offset = 0;  // the offset and min terms, through the activation sums
    if constexpr (F == Format::Q8_0 || F == Format::Q4_0 || F == Format::Q4_1 || F == Format::Q5_0 ||
                  F == Format::Q5_1) {
        for (int b = 0; b < K / 32; ++b) {
            const __m256i x = load32(a[b].qs);
            __m256i p;
            float d;
            if constexpr (F == Format::Q8_0) {
                const auto* blk = reinterpret_cast<const BlockQ8_0*>(w) + b;
                const __m256i q = load32(blk->qs);
                p = dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));  // |q| * (x with q's sign)
                d = f16(blk->d);
            } else if constexpr (F == Format::Q4_0) {
                const auto* blk = reinterpret_cast<const BlockQ4_0*>(w) + b;
                p = dot_u8s8(nibbles(blk->qs), x);
                d = f16(blk->d);
                offset -= 8 * d * a[b].s;
            } else if constexpr (F == Format::Q4_1) {
                const auto* blk = reinterpret_cast<const BlockQ4_1*>(w) + b;
                p = dot_u8s8(nibbles(blk->qs), x);
                d = f16(blk->d);
                offset += f16(blk->m) * a[b].s;
            } else if constexpr (F == Format::Q5_0) {
                const auto* blk = reinterpret_cast<const BlockQ5_0*>(w) + b;
                p = dot_u8s8(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), x);
                d = f16(blk->d);
                offset -= 16 * d * a[b].s;
            } else {
                const auto* blk = reinterpret_cast<const BlockQ5_1*>(w) + b;
                p = dot_u8s8(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), x);
                d = f16(blk->d);
                offset += f16(blk->m) * a[b].s;
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[b].d), acc);
        }
    } else if constexpr (F == Format::Q4_K || F == Format::Q5_K) {
        constexpr bool q5 = F == Format::Q5_K;
        using Block = std::conditional_t<q5, BlockQ5_K, BlockQ4_K>;
        for (int sb = 0; sb < K / 256; ++sb) {
            const Block* blk = reinterpret_cast<const Block*>(w) + sb;
            const ActBlock* as = a + 8 * sb;
            const float d = f16(blk->d), dmin = f16(blk->dmin);
            __m256i high = _mm256_setzero_si256();
            if constexpr (q5) high = load32(blk->qh);
            for (int j = 0; j < 4; ++j) {  // 64 weights: sub-blocks 2j (low nibbles) and 2j + 1 (high)
                const __m256i qs = load32(blk->qs + 32 * j);
                __m256i lo = _mm256_and_si256(qs, _mm256_set1_epi8(0x0F)), hi = byte_bits(qs, 4, 0x0F);
                if constexpr (q5) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(byte_bits(high, 2 * j, 1), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(byte_bits(high, 2 * j + 1, 1), 4));
                }
                uint8_t sc0, mn0, sc1, mn1;
                unpack_scale_min(blk->scales, 2 * j, &sc0, &mn0);
                unpack_scale_min(blk->scales, 2 * j + 1, &sc1, &mn1);
                const ActBlock &a0 = as[2 * j], &a1 = as[2 * j + 1];
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(a0.qs)), _mm256_set1_epi16(sc0));
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(a1.qs)), _mm256_set1_epi16(sc1));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d * a0.d), acc);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d * a1.d), acc);
                offset -= dmin * (float(mn0) * a0.s + float(mn1) * a1.s);
            }
        }
    } else {
        static_assert(F == Format::Q6_K, "a block format");
        const __m256i m32 = _mm256_set1_epi8(32);
        for (int sb = 0; sb < K / 256; ++sb) {
            const BlockQ6_K* blk = reinterpret_cast<const BlockQ6_K*>(w) + sb;
            const float d = f16(blk->d);
            for (int h = 0; h < 2; ++h) {  // 128 weights: four activation blocks
                const __m256i ql0 = load32(blk->ql + 64 * h), ql1 = load32(blk->ql + 64 * h + 32);
                const __m256i qh = load32(blk->qh + 32 * h);
                const __m256i q[4] = {
                    _mm256_or_si256(_mm256_and_si256(ql0, _mm256_set1_epi8(0x0F)), _mm256_slli_epi16(byte_bits(qh, 0, 3), 4)),
                    _mm256_or_si256(_mm256_and_si256(ql1, _mm256_set1_epi8(0x0F)), _mm256_slli_epi16(byte_bits(qh, 2, 3), 4)),
                    _mm256_or_si256(byte_bits(ql0, 4, 0x0F), _mm256_slli_epi16(byte_bits(qh, 4, 3), 4)),
                    _mm256_or_si256(byte_bits(ql1, 4, 0x0F), _mm256_slli_epi16(byte_bits(qh, 6, 3), 4)),
                };
                for (int k = 0; k < 4; ++k) {
                    const ActBlock& ab = a[8 * sb + 4 * h + k];
                    const __m256i x = load32(ab.qs);
                    // (q - 32) . x per pair, then scaled per 16 weights: sub-blocks 8h + 2k and 8h + 2k + 1
                    const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q[k], x), _mm256_maddubs_epi16(m32, x));
                    const int s = 8 * h + 2 * k;
                    const __m256i sc = _mm256_set_m128i(_mm_set1_epi16(blk->scales[s + 1]), _mm_set1_epi16(blk->scales[s]));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, sc)), _mm256_set1_ps(d * ab.d), acc);
                }
            }
        }
    }
    return hsum(acc) + offset;
}

template <Format F>
void matmul(float* Y, size_t ldy, const ActBlock* A, int T, const void* W, size_t row_bytes, int K, int N) {
    const int nb = K / kActBlock;
    for (int n = 0; n < N; ++n) {
        const uint8_t* w = static_cast<const uint8_t*>(W) + n * row_bytes;
        for (int t = 0; t < T; ++t) Y[t * ldy + n] = row_dot<F>(w, A + size_t(t) * nb, K);
    }
}

void quantize_act(const float* x, ActBlock* out, int K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < K / kActBlock; ++b) {
        const float* xb = x + b * kActBlock;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const float d = mx / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; ++i)  // round to nearest even, as the reference's nearbyint
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        // int32 -> int8 keeping the order: packs work per 128-bit lane, so undo the lane interleave
        const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs), q8);
        out[b].d = d;
        out[b].s = d * float(_mm_cvtsi128_si32(s));
    }
}

}  // namespace

// Constant-initialized: no code of this file runs before the CPU is known to have AVX2.
extern const QuantKernels avx2_table;
const QuantKernels avx2_table = {
    "avx2",
    quantize_act,
    {nullptr, nullptr, nullptr, matmul<Format::Q8_0>, matmul<Format::Q4_0>, matmul<Format::Q4_1>, matmul<Format::Q5_0>,
     matmul<Format::Q5_1>, matmul<Format::Q4_K>, matmul<Format::Q5_K>, matmul<Format::Q6_K>},
};

}  // namespace fm::quant
