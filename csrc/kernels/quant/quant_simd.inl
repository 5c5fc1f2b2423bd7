// The SIMD kernels for the block formats (quant.h): activations quantized to int8 blocks of 32,
// weights unpacked to bytes, products summed by maddubs (u8 x s8 -> s16 pairs) and madd (-> s32),
// then scaled in f32 once per block. Offsets and mins go through the activation sums.
//
// Included by one translation unit per instruction set, which names its table and compiles with
// its flags (and -ffp-contract=off): quant_avx2.cpp (AVX2, FMA, F16C) and quant_avx512.cpp
// (AVX-512 VNNI with VL: FM_QUANT_VNNI set, the u8 x s8 and s16 x s16 dot products summed into
// int32 by one instruction, vpdpbusd / vpdpwssd, and 32 vector registers). The integer sums are
// exact either way, so both tables give bit-identical results.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

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

// acc + the sums of u[i] * s[i] over groups of 4 bytes: 8 int32 lanes. u unsigned, s signed, and
// no pair of products beyond int16 (maddubs saturates there; every caller stays below).
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if FM_QUANT_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256i dot_u8s8(__m256i u, __m256i s) { return dpbusd(_mm256_setzero_si256(), u, s); }

// acc + the sums of a[i] * b[i] over pairs of int16: 8 int32 lanes.
inline __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
#if FM_QUANT_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
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

// One 32-weight block of the formats with 32-weight blocks, against activations x: the integer
// products summed into 8 lanes, and the block's scale d and offset coefficient c, so that the
// block contributes d * a.d * sum(lanes) + c * a.s.
template <Format F>
inline __m256i block32(const uint8_t* p, __m256i x, float* d, float* c) {
    if constexpr (F == Format::Q8_0) {
        const auto* blk = reinterpret_cast<const BlockQ8_0*>(p);
        const __m256i q = load32(blk->qs);
        *d = f16(blk->d), *c = 0;
        return dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));  // |q| * (x with q's sign)
    } else if constexpr (F == Format::Q4_0) {
        const auto* blk = reinterpret_cast<const BlockQ4_0*>(p);
        *d = f16(blk->d), *c = -8 * *d;
        return dot_u8s8(nibbles(blk->qs), x);
    } else if constexpr (F == Format::Q4_1) {
        const auto* blk = reinterpret_cast<const BlockQ4_1*>(p);
        *d = f16(blk->d), *c = f16(blk->m);
        return dot_u8s8(nibbles(blk->qs), x);
    } else if constexpr (F == Format::Q5_0) {
        const auto* blk = reinterpret_cast<const BlockQ5_0*>(p);
        *d = f16(blk->d), *c = -16 * *d;
        return dot_u8s8(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), x);
    } else {
        static_assert(F == Format::Q5_1, "a format with 32-weight blocks");
        const auto* blk = reinterpret_cast<const BlockQ5_1*>(p);
        *d = f16(blk->d), *c = f16(blk->m);
        return dot_u8s8(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), x);
    }
}

constexpr bool has_32_blocks(Format F) {
    return F == Format::Q8_0 || F == Format::Q4_0 || F == Format::Q4_1 || F == Format::Q5_0 || F == Format::Q5_1;
}

// q5_k's fifth bits (qh; bit s of byte l: sub-block s, weight l); nothing for q4_k.
template <Format F, typename Block>
inline __m256i fifth_bit_planes(const Block* blk) {
    if constexpr (F == Format::Q5_K) return load32(blk->qh);
    else return _mm256_setzero_si256();
}

// Weights 64j..64j+63 of a q4_k or q5_k super-block as bytes: sub-block 2j (lo) and 2j + 1 (hi);
// high holds q5_k's qh (the fifth bits).
template <Format F, typename Block>
inline void k45_unpack(const Block* blk, int j, __m256i high, __m256i& lo, __m256i& hi) {
    const __m256i qs = load32(blk->qs + 32 * j);
    lo = _mm256_and_si256(qs, _mm256_set1_epi8(0x0F)), hi = byte_bits(qs, 4, 0x0F);
    if constexpr (F == Format::Q5_K) {
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(byte_bits(high, 2 * j, 1), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(byte_bits(high, 2 * j + 1, 1), 4));
    }
}

// Weights 128h..128h+127 of a q6_k super-block as bytes (0..63, not yet less 32), 32 per q[k].
inline void q6k_unpack(const BlockQ6_K* blk, int h, __m256i q[4]) {
    const __m256i ql0 = load32(blk->ql + 64 * h), ql1 = load32(blk->ql + 64 * h + 32);
    const __m256i qh = load32(blk->qh + 32 * h), low = _mm256_set1_epi8(0x0F);
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16(byte_bits(qh, 0, 3), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low), _mm256_slli_epi16(byte_bits(qh, 2, 3), 4));
    q[2] = _mm256_or_si256(byte_bits(ql0, 4, 0x0F), _mm256_slli_epi16(byte_bits(qh, 4, 3), 4));
    q[3] = _mm256_or_si256(byte_bits(ql1, 4, 0x0F), _mm256_slli_epi16(byte_bits(qh, 6, 3), 4));
}

// One 256-weight super-block of q4_k or q5_k against its 8 activation blocks: adds to acc and offset.
template <Format F>
inline void superblock_k45(const uint8_t* p, const ActBlock* as, __m256& acc, float& offset) {
    constexpr bool q5 = F == Format::Q5_K;
    using Block = std::conditional_t<q5, BlockQ5_K, BlockQ4_K>;
    const Block* blk = reinterpret_cast<const Block*>(p);
    const float d = f16(blk->d), dmin = f16(blk->dmin);
    const __m256i high = fifth_bit_planes<F>(blk);
    for (int j = 0; j < 4; ++j) {  // 64 weights: sub-blocks 2j (low nibbles) and 2j + 1 (high)
        __m256i lo, hi;
        k45_unpack<F>(blk, j, high, lo, hi);
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

// One 256-weight super-block of q6_k against its 8 activation blocks: adds to acc.
inline void superblock_q6k(const uint8_t* p, const ActBlock* as, __m256& acc) {
    const BlockQ6_K* blk = reinterpret_cast<const BlockQ6_K*>(p);
    const __m256i m32 = _mm256_set1_epi8(32);
    const float d = f16(blk->d);
    for (int h = 0; h < 2; ++h) {  // 128 weights: four activation blocks
        __m256i q[4];
        q6k_unpack(blk, h, q);
        for (int k = 0; k < 4; ++k) {
            const ActBlock& ab = as[4 * h + k];
            const __m256i x = load32(ab.qs);
            // (q - 32) . x per pair, then scaled per 16 weights: sub-blocks 8h + 2k and 8h + 2k + 1
            const __m256i pr = _mm256_sub_epi16(_mm256_maddubs_epi16(q[k], x), _mm256_maddubs_epi16(m32, x));
            const int s = 8 * h + 2 * k;
            const __m256i sc = _mm256_set_m128i(_mm_set1_epi16(blk->scales[s + 1]), _mm_set1_epi16(blk->scales[s]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pr, sc)), _mm256_set1_ps(d * ab.d), acc);
        }
    }
}

// out[r] = row w[r] (K weights) . one token's activation blocks, for NR rows.
// NR rows at a time share each activation load and keep NR independent sums in flight.
template <Format F, int NR>
inline void dot_rows(const uint8_t* const* w, const ActBlock* a, int K, float* out) {
    __m256 acc[NR];
    float offset[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0;
    if constexpr (has_32_blocks(F)) {
        constexpr int bb = F == Format::Q8_0 ? 34 : F == Format::Q4_0 ? 18 : F == Format::Q4_1 ? 20
                         : F == Format::Q5_0 ? 22 : 24;
        for (int b = 0; b < K / 32; ++b) {
            const __m256i x = load32(a[b].qs);
            for (int r = 0; r < NR; ++r) {
                float d, c;
                const __m256i p = block32<F>(w[r] + b * bb, x, &d, &c);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[b].d), acc[r]);
                if constexpr (F != Format::Q8_0) offset[r] += c * a[b].s;  // q8_0 has no offset
            }
        }
    } else {
        constexpr int bb = F == Format::Q4_K ? 144 : F == Format::Q5_K ? 176 : 210;
        for (int sb = 0; sb < K / 256; ++sb)
            for (int r = 0; r < NR; ++r) {
                if constexpr (F == Format::Q6_K) superblock_q6k(w[r] + sb * bb, a + 8 * sb, acc[r]);
                else superblock_k45<F>(w[r] + sb * bb, a + 8 * sb, acc[r], offset[r]);
            }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(acc[r]) + offset[r];
}

// --- 16-bit activations -------------------------------------------------------------------------

// 32 weights given as bytes (signed, else unsigned, less `zero`) times 32 int16 activations:
// the products summed in pairs into 8 int32 lanes, for weights 0..15 (lo) and 16..31 (hi).
template <bool Signed>
inline void dot32_i16(__m256i bytes, const int16_t* x, int zero, __m256i& lo, __m256i& hi) {
    const __m128i b0 = _mm256_castsi256_si128(bytes), b1 = _mm256_extracti128_si256(bytes, 1);
    __m256i w0 = Signed ? _mm256_cvtepi8_epi16(b0) : _mm256_cvtepu8_epi16(b0);
    __m256i w1 = Signed ? _mm256_cvtepi8_epi16(b1) : _mm256_cvtepu8_epi16(b1);
    if (zero) w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(short(zero))), w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(short(zero)));
    lo = _mm256_madd_epi16(w0, load32(x));
    hi = _mm256_madd_epi16(w1, load32(x + 16));
}

// acc += (lo + hi) * scale: one block of 32 weights with one scale.
inline __m256 add_scaled(__m256 acc, __m256i lo, __m256i hi, float scale) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_set1_ps(scale), acc);
}

// As dot_rows, with 16-bit activations.
template <Format F, int NR>
inline void dot_rows16(const uint8_t* const* w, const ActBlock16* a, int K, float* out) {
    __m256 acc[NR];
    float offset[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0;
    __m256i lo, hi;
    if constexpr (has_32_blocks(F)) {
        constexpr int bb = F == Format::Q8_0 ? 34 : F == Format::Q4_0 ? 18 : F == Format::Q4_1 ? 20
                         : F == Format::Q5_0 ? 22 : 24;
        for (int b = 0; b < K / 32; ++b)
            for (int r = 0; r < NR; ++r) {
                const uint8_t* p = w[r] + b * bb;
                float d, c = 0;
                if constexpr (F == Format::Q8_0) {
                    const auto* blk = reinterpret_cast<const BlockQ8_0*>(p);
                    d = f16(blk->d);
                    dot32_i16<true>(load32(blk->qs), a[b].qs, 0, lo, hi);
                } else if constexpr (F == Format::Q4_0) {
                    const auto* blk = reinterpret_cast<const BlockQ4_0*>(p);
                    d = f16(blk->d);
                    dot32_i16<false>(nibbles(blk->qs), a[b].qs, 8, lo, hi);
                } else if constexpr (F == Format::Q4_1) {
                    const auto* blk = reinterpret_cast<const BlockQ4_1*>(p);
                    d = f16(blk->d), c = f16(blk->m);
                    dot32_i16<false>(nibbles(blk->qs), a[b].qs, 0, lo, hi);
                } else if constexpr (F == Format::Q5_0) {
                    const auto* blk = reinterpret_cast<const BlockQ5_0*>(p);
                    d = f16(blk->d);
                    dot32_i16<false>(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), a[b].qs, 16, lo, hi);
                } else {
                    const auto* blk = reinterpret_cast<const BlockQ5_1*>(p);
                    d = f16(blk->d), c = f16(blk->m);
                    dot32_i16<false>(_mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh)), a[b].qs, 0, lo, hi);
                }
                acc[r] = add_scaled(acc[r], lo, hi, d * a[b].d);
                offset[r] += c * a[b].s;
            }
    } else if constexpr (F == Format::Q4_K || F == Format::Q5_K) {
        constexpr bool q5 = F == Format::Q5_K;
        using Block = std::conditional_t<q5, BlockQ5_K, BlockQ4_K>;
        for (int sb = 0; sb < K / 256; ++sb)
            for (int r = 0; r < NR; ++r) {
                const Block* blk = reinterpret_cast<const Block*>(w[r]) + sb;
                const ActBlock16* as = a + 8 * sb;
                const float d = f16(blk->d), dmin = f16(blk->dmin);
                const __m256i high = fifth_bit_planes<F>(blk);
                for (int j = 0; j < 4; ++j) {
                    __m256i q[2];
                    k45_unpack<F>(blk, j, high, q[0], q[1]);
                    for (int h = 0; h < 2; ++h) {
                        uint8_t sc, mn;
                        unpack_scale_min(blk->scales, 2 * j + h, &sc, &mn);
                        dot32_i16<false>(q[h], as[2 * j + h].qs, 0, lo, hi);
                        acc[r] = add_scaled(acc[r], lo, hi, d * float(sc) * as[2 * j + h].d);
                        offset[r] -= dmin * float(mn) * as[2 * j + h].s;
                    }
                }
            }
    } else {
        static_assert(F == Format::Q6_K, "a block format");
        for (int sb = 0; sb < K / 256; ++sb)
            for (int r = 0; r < NR; ++r) {
                const BlockQ6_K* blk = reinterpret_cast<const BlockQ6_K*>(w[r]) + sb;
                const float d = f16(blk->d);
                for (int h = 0; h < 2; ++h) {
                    __m256i q[4];
                    q6k_unpack(blk, h, q);
                    for (int k = 0; k < 4; ++k) {
                        const ActBlock16& ab = a[8 * sb + 4 * h + k];
                        const int s = 8 * h + 2 * k;  // sub-blocks of 16: s for lo, s + 1 for hi
                        dot32_i16<false>(q[k], ab.qs, 32, lo, hi);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(d * float(blk->scales[s]) * ab.d), acc[r]);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(d * float(blk->scales[s + 1]) * ab.d), acc[r]);
                    }
                }
            }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(acc[r]) + offset[r];
}

template <Format F, int NR, typename Act>
inline void dot_any(const uint8_t* w, size_t row_bytes, const Act* a, int K, float* out) {
    const uint8_t* rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = w + r * row_bytes;
    if constexpr (std::is_same_v<Act, ActBlock>) dot_rows<F, NR>(rows, a, K, out);
    else dot_rows16<F, NR>(rows, a, K, out);
}

// Y (T, N) = W x for every token, NR rows at a time (rows outer: they stay in L1 while every
// token passes over them), the rows PF groups ahead asked for from memory. Act: ActBlock (8-bit
// activations) or ActBlock16.
template <Format F, typename Act, int NR, int PF>
void matmul_rows(float* Y, size_t ldy, const Act* A, int T, const uint8_t* w, size_t row_bytes, int K, int N) {
    const int nb = K / kActBlock;
    float out[NR];
    int n = 0;
    for (; n + NR <= N; n += NR) {
        if (n + (PF + 1) * NR <= N) {
            const uint8_t* ahead = w + size_t(n + PF * NR) * row_bytes;
            for (size_t off = 0; off < NR * row_bytes; off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        }
        for (int t = 0; t < T; ++t) {
            dot_any<F, NR>(w + n * row_bytes, row_bytes, A + size_t(t) * nb, K, out);
            for (int r = 0; r < NR; ++r) Y[t * ldy + n + r] = out[r];
        }
    }
    for (; n < N; ++n)
        for (int t = 0; t < T; ++t) dot_any<F, 1>(w + n * row_bytes, row_bytes, A + size_t(t) * nb, K, &Y[t * ldy + n]);
}

// --- several tokens: a tile of RR rows x RT tokens -----------------------------------------------

// One 32-weight block of a 32-block format unpacked: its weights as bytes (unsigned, or q8_0's
// signed ones), its scale d and offset coefficient c (as block32).
template <Format F>
inline __m256i unpack32(const uint8_t* p, float* d, float* c) {
    if constexpr (F == Format::Q8_0) {
        const auto* blk = reinterpret_cast<const BlockQ8_0*>(p);
        *d = f16(blk->d), *c = 0;
        return load32(blk->qs);
    } else if constexpr (F == Format::Q4_0) {
        const auto* blk = reinterpret_cast<const BlockQ4_0*>(p);
        *d = f16(blk->d), *c = -8 * *d;
        return nibbles(blk->qs);
    } else if constexpr (F == Format::Q4_1) {
        const auto* blk = reinterpret_cast<const BlockQ4_1*>(p);
        *d = f16(blk->d), *c = f16(blk->m);
        return nibbles(blk->qs);
    } else if constexpr (F == Format::Q5_0) {
        const auto* blk = reinterpret_cast<const BlockQ5_0*>(p);
        *d = f16(blk->d), *c = -16 * *d;
        return _mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh));
    } else {
        static_assert(F == Format::Q5_1, "a format with 32-weight blocks");
        const auto* blk = reinterpret_cast<const BlockQ5_1*>(p);
        *d = f16(blk->d), *c = f16(blk->m);
        return _mm256_or_si256(nibbles(blk->qs), fifth_bits(blk->qh));
    }
}

// The activation scales and sums of T tokens, block-major (nb, T) and padded by 4 floats, so that
// a tile reads the RT tokens' values of a block with one load.
template <typename Act>
struct TokenScales {
    std::vector<float> d, s;
    int T = 0;
    void fill(const Act* A, int T_, int nb) {
        T = T_;
        d.assign(size_t(nb) * T + 4, 0.0f), s.assign(size_t(nb) * T + 4, 0.0f);
        for (int t = 0; t < T; ++t)
            for (int b = 0; b < nb; ++b) d[size_t(b) * T + t] = A[size_t(t) * nb + b].d, s[size_t(b) * T + t] = A[size_t(t) * nb + b].s;
    }
};

// Lane t of v in every lane.
template <int t>
inline __m256 lane(__m128 v) {
    return _mm256_broadcastss_ps(t == 0 ? v : _mm_shuffle_ps(v, v, _MM_SHUFFLE(t, t, t, t)));
}

// Y[t][r] = row w[r] . token t's activation blocks a[t], for RR rows and RT <= 4 tokens (from
// token t0 of `ts`): each weight block is unpacked once for the RT tokens, each activation block
// loaded once per row, and the RR * RT sums stay in registers; the block scales d * a.d of the RT
// tokens come from one vector product, and the offsets c * a.s are summed in a vector lane per
// token. Per row and token these are the same operations in the same order as dot_rows: the
// results are bit-identical to one token at a time (a batch of sequences decodes exactly as each
// alone).
template <Format F, int RR, int RT>
inline void dot_tile(const uint8_t* const* w, const ActBlock* const* a, const TokenScales<ActBlock>& ts, int t0, int K,
                     float* Y, size_t ldy) {
    constexpr int bb = F == Format::Q8_0 ? 34 : F == Format::Q4_0 ? 18 : F == Format::Q4_1 ? 20
                     : F == Format::Q5_0 ? 22 : 24;
    __m256 acc[RT][RR];
    __m128 offset[RR];
    for (int r = 0; r < RR; ++r) {
        offset[r] = _mm_setzero_ps();
        for (int t = 0; t < RT; ++t) acc[t][r] = _mm256_setzero_ps();
    }
    const float* td = ts.d.data() + t0;
    const float* tsum = ts.s.data() + t0;
    for (int b = 0; b < K / 32; ++b) {
        const __m128 ad = _mm_loadu_ps(td + size_t(b) * ts.T);
        for (int r = 0; r < RR; ++r) {
            float d, c;
            const __m256i u = unpack32<F>(w[r] + b * bb, &d, &c);
            const __m128 scale = _mm_mul_ps(ad, _mm_set1_ps(d));  // d * a.d of each token
            if constexpr (F != Format::Q8_0)
                offset[r] = _mm_add_ps(offset[r], _mm_mul_ps(_mm_set1_ps(c), _mm_loadu_ps(tsum + size_t(b) * ts.T)));
            const __m256i us = F == Format::Q8_0 ? _mm256_sign_epi8(u, u) : u;
            auto one = [&](auto tc) {
                constexpr int t = decltype(tc)::value;
                const __m256i x = load32(a[t][b].qs);
                const __m256i p = F == Format::Q8_0 ? dot_u8s8(us, _mm256_sign_epi8(x, u)) : dot_u8s8(u, x);
                acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane<t>(scale), acc[t][r]);
            };
            one(std::integral_constant<int, 0>{});
            if constexpr (RT > 1) one(std::integral_constant<int, 1>{});
            if constexpr (RT > 2) one(std::integral_constant<int, 2>{});
            if constexpr (RT > 3) one(std::integral_constant<int, 3>{});
        }
    }
    for (int r = 0; r < RR; ++r) {
        alignas(16) float off[4];
        _mm_store_ps(off, offset[r]);
        for (int t = 0; t < RT; ++t) Y[t * ldy + r] = hsum(acc[t][r]) + off[t];
    }
}

// As dot_tile, with 16-bit activations (the LM head's): each block's weights widened to int16
// once (less the format's zero, as dot_rows16), for RT tokens; bit-identical to dot_rows16.
template <Format F, int RT>
inline void dot_tile16(const uint8_t* w, const ActBlock16* const* a, int K, float* Y, size_t ldy) {
    constexpr int bb = F == Format::Q8_0 ? 34 : F == Format::Q4_0 ? 18 : F == Format::Q4_1 ? 20
                     : F == Format::Q5_0 ? 22 : 24;
    constexpr int zero = F == Format::Q4_0 ? 8 : F == Format::Q5_0 ? 16 : 0;
    __m256 acc[RT];
    float offset[RT];
    for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps(), offset[t] = 0;
    for (int b = 0; b < K / 32; ++b) {
        float d, c;
        const __m256i bytes = unpack32<F>(w + b * bb, &d, &c);
        if constexpr (zero != 0) c = 0;  // q4_0 and q5_0: the zero is subtracted from the weights here
        const __m128i b0 = _mm256_castsi256_si128(bytes), b1 = _mm256_extracti128_si256(bytes, 1);
        __m256i w0 = F == Format::Q8_0 ? _mm256_cvtepi8_epi16(b0) : _mm256_cvtepu8_epi16(b0);
        __m256i w1 = F == Format::Q8_0 ? _mm256_cvtepi8_epi16(b1) : _mm256_cvtepu8_epi16(b1);
        if constexpr (zero != 0)
            w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(short(zero))), w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(short(zero)));
        for (int t = 0; t < RT; ++t) {
            const ActBlock16& ab = a[t][b];
            const __m256i lo = _mm256_madd_epi16(w0, load32(ab.qs)), hi = _mm256_madd_epi16(w1, load32(ab.qs + 16));
            acc[t] = add_scaled(acc[t], lo, hi, d * ab.d);
            offset[t] += c * ab.s;
        }
    }
    for (int t = 0; t < RT; ++t) Y[t * ldy] = hsum(acc[t]) + offset[t];
}

// Calls tile(std::integral_constant<int, RT>, a, t) for the T tokens of A (nb blocks each) in
// tiles of RT = 4 tokens, then one tile of the 1-3 left: a[i] points at token t + i's blocks.
template <typename Act, typename Tile>
inline void for_token_tiles(const Act* A, int T, int nb, Tile&& tile) {
    const Act* a[4];
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        for (int i = 0; i < 4; ++i) a[i] = A + size_t(t + i) * nb;
        tile(std::integral_constant<int, 4>{}, a, t);
    }
    for (int i = 0; t + i < T; ++i) a[i] = A + size_t(t + i) * nb;
    switch (T - t) {
        case 3: tile(std::integral_constant<int, 3>{}, a, t); break;
        case 2: tile(std::integral_constant<int, 2>{}, a, t); break;
        case 1: tile(std::integral_constant<int, 1>{}, a, t); break;
        default: break;
    }
}

template <Format F>
void matmul_tiled16(float* Y, size_t ldy, const ActBlock16* A, int T, const uint8_t* w, size_t row_bytes, int K,
                    int N) {
    const int nb = K / kActBlock;
    for (int n = 0; n < N; ++n) {
        if (n + 4 < N) {
            const uint8_t* ahead = w + size_t(n + 4) * row_bytes;
            for (size_t off = 0; off < row_bytes; off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        }
        const uint8_t* row = w + size_t(n) * row_bytes;
        for_token_tiles(A, T, nb, [&](auto rt, const ActBlock16* const* a, int t) {
            dot_tile16<F, decltype(rt)::value>(row, a, K, Y + t * ldy + n, ldy);
        });
    }
}

// Y (T, N) = W x for T >= 2 tokens in a 32-block format: rows in pairs (the pair two ahead asked
// for from memory), tokens in tiles of 4 over each pair while it is in L1.
template <Format F, int RR>
inline void tile_rows(float* Y, size_t ldy, const ActBlock* A, const TokenScales<ActBlock>& ts, const uint8_t* w,
                      size_t row_bytes, int K, int n) {
    const int nb = K / kActBlock, T = ts.T;
    const uint8_t* rows[RR];
    for (int r = 0; r < RR; ++r) rows[r] = w + size_t(n + r) * row_bytes;
    for_token_tiles(A, T, nb, [&](auto rt, const ActBlock* const* a, int t) {
        dot_tile<F, RR, decltype(rt)::value>(rows, a, ts, t, K, Y + t * ldy + n, ldy);
    });
}

template <Format F>
void matmul_tiled(float* Y, size_t ldy, const ActBlock* A, int T, const uint8_t* w, size_t row_bytes, int K, int N) {
    constexpr int RR = 2, PF = 2;
    thread_local TokenScales<ActBlock> ts;
    ts.fill(A, T, K / kActBlock);
    int n = 0;
    for (; n + RR <= N; n += RR) {
        if (n + (PF + 1) * RR <= N) {
            const uint8_t* ahead = w + size_t(n + PF * RR) * row_bytes;
            for (size_t off = 0; off < RR * row_bytes; off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        }
        tile_rows<F, RR>(Y, ldy, A, ts, w, row_bytes, K, n);
    }
    for (; n < N; ++n) tile_rows<F, 1>(Y, ldy, A, ts, w, row_bytes, K, n);
}

// --- q4_0 and q4_1 with 8 rows interleaved (repack_x8): the 8 float lanes are the 8 rows ----------

// Y[t][0..8) = the 8 rows of group g . token t, for RT tokens. Per block: 4 vectors of nibbles
// give 8 vectors of 4 weights x 8 rows; each is multiplied (maddubs) by the token's matching 4
// activations broadcast, summed in 16 bits (at most 8 x 2 x 15 x 128 = 30720: no overflow), then
// once into 32 bits, converted, and scaled by the 8 rows' d times the token's d; the offset
// c * a.s is one FMA for the 8 rows. Each row sees the same operations for any RT.
template <bool Min, int RT>
inline void x8_tile(const BlockQ4x8<Min>* g, const ActBlock* const* a, int nb, float* Y, size_t ldy,
                    const char* ahead) {  // ahead: as x16_tile, for the group after next
    __m256 acc[RT];
    for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nb; ++b) {
        const BlockQ4x8<Min>& blk = g[b];
        if (ahead)
            for (size_t off = 0; off < sizeof(blk); off += 64) _mm_prefetch(ahead + b * sizeof(blk) + off, _MM_HINT_T0);
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d)));
        __m256 c8;
        if constexpr (Min) c8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.m)));
        else c8 = _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));
        __m256i sum[RT];
        for (int t = 0; t < RT; ++t) sum[t] = _mm256_setzero_si256();
#if FM_QUANT_VNNI
        __m256i sum2[RT];  // the high nibbles' products: two dependency chains per token
        for (int t = 0; t < RT; ++t) sum2[t] = _mm256_setzero_si256();
#endif
        for (int v = 0; v < 4; ++v) {
            const __m256i q = load32(blk.qs + 32 * v);
            const __m256i lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
            for (int t = 0; t < RT; ++t) {
                int32_t x0, x1;
                std::memcpy(&x0, a[t][b].qs + 8 * v, 4);
                std::memcpy(&x1, a[t][b].qs + 8 * v + 4, 4);
#if FM_QUANT_VNNI
                sum[t] = _mm256_dpbusd_epi32(sum[t], lo, _mm256_set1_epi32(x0));
                sum2[t] = _mm256_dpbusd_epi32(sum2[t], hi, _mm256_set1_epi32(x1));
#else
                sum[t] = _mm256_add_epi16(sum[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                sum[t] = _mm256_add_epi16(sum[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
#endif
            }
        }
        for (int t = 0; t < RT; ++t) {
            const ActBlock& ab = a[t][b];
#if FM_QUANT_VNNI
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(sum[t], sum2[t]));
#else
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[t], ones));
#endif
            acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d8, _mm256_set1_ps(ab.d)), acc[t]);
            acc[t] = _mm256_fmadd_ps(c8, _mm256_set1_ps(ab.s), acc[t]);
        }
    }
    for (int t = 0; t < RT; ++t) _mm256_storeu_ps(Y + t * ldy, acc[t]);
}

#if FM_QUANT_VNNI
// As x8_tile for two groups at once (16 rows) in 512-bit vectors: half the instructions per
// product, the same operations per row (bit-identical).
// `ahead`: where the next two groups start, asked for from memory a block at a time while this
// tile computes (nullptr: not), so that the requests are spread out: a burst of prefetches
// stalls the core once the misses outstanding fill up.
template <bool Min, int RT>
inline void x16_tile(const BlockQ4x8<Min>* g0, const BlockQ4x8<Min>* g1, const ActBlock* const* a, int nb, float* Y,
                     size_t ldy, const char* ahead) {
    __m512 acc[RT];
    for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    auto pair = [](const void* p0, const void* p1) {
        return _mm512_inserti64x4(_mm512_castsi256_si512(load32(p0)), load32(p1), 1);
    };
    auto halves = [](const void* h0, const void* h1) {  // 8 f16 each, at any byte
        return _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h0))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(h1)), 1));
    };
    for (int b = 0; b < nb; ++b) {
        const BlockQ4x8<Min>& b0 = g0[b];
        const BlockQ4x8<Min>& b1 = g1[b];
        if (ahead)
            for (size_t off = 0; off < 2 * sizeof(b0); off += 64)
                _mm_prefetch(ahead + 2 * b * sizeof(b0) + off, _MM_HINT_T0);
        const __m512 d16 = halves(&b0, &b1);  // d[8] opens each block
        __m512 c16;
        if constexpr (Min) {  // m[8] after d[8]
            constexpr size_t m = offsetof(BlockQ4x8<Min>, m);
            c16 = halves(reinterpret_cast<const char*>(&b0) + m, reinterpret_cast<const char*>(&b1) + m);
        }
        else c16 = _mm512_mul_ps(d16, _mm512_set1_ps(-8.0f));
        __m512i sum[RT], sum2[RT];
        for (int t = 0; t < RT; ++t) sum[t] = sum2[t] = _mm512_setzero_si512();
        for (int v = 0; v < 4; ++v) {
            const __m512i q = pair(b0.qs + 32 * v, b1.qs + 32 * v);
            const __m512i lo = _mm512_and_si512(q, low), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
            for (int t = 0; t < RT; ++t) {
                int32_t x0, x1;
                std::memcpy(&x0, a[t][b].qs + 8 * v, 4);
                std::memcpy(&x1, a[t][b].qs + 8 * v + 4, 4);
                sum[t] = _mm512_dpbusd_epi32(sum[t], lo, _mm512_set1_epi32(x0));
                sum2[t] = _mm512_dpbusd_epi32(sum2[t], hi, _mm512_set1_epi32(x1));
            }
        }
        for (int t = 0; t < RT; ++t) {
            const ActBlock& ab = a[t][b];
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sum[t], sum2[t]));
            acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d16, _mm512_set1_ps(ab.d)), acc[t]);
            acc[t] = _mm512_fmadd_ps(c16, _mm512_set1_ps(ab.s), acc[t]);
        }
    }
    for (int t = 0; t < RT; ++t) _mm512_storeu_ps(Y + t * ldy, acc[t]);
}
#endif

template <Format F>
void matmul_x8(float* Y, size_t ldy, const ActBlock* A, int T, const void* W, size_t row_bytes, int K, int N) {
    constexpr bool Min = F == Format::Q4_1;
    const int nb = K / 32;
    const auto* w = static_cast<const uint8_t*>(W);
    const size_t group = 8 * row_bytes;
#if FM_QUANT_VNNI
    if (T >= 2) {  // two groups at a time (the last one alone where N / 8 is odd)
        int n = 0;
        for (; n + 16 <= N; n += 16) {
            const auto* g = reinterpret_cast<const BlockQ4x8<Min>*>(w + size_t(n / 8) * group);
            const char* ahead = n + 32 <= N ? reinterpret_cast<const char*>(g + 2 * nb) : nullptr;
            for_token_tiles(A, T, nb, [&](auto rt, const ActBlock* const* a, int t) {
                x16_tile<Min, decltype(rt)::value>(g, g + nb, a, nb, Y + t * ldy + n, ldy, t == 0 ? ahead : nullptr);
            });
        }
        if (n < N) {
            const auto* g = reinterpret_cast<const BlockQ4x8<Min>*>(w + size_t(n / 8) * group);
            for_token_tiles(A, T, nb, [&](auto rt, const ActBlock* const* a, int t) {
                x8_tile<Min, decltype(rt)::value>(g, a, nb, Y + t * ldy + n, ldy, nullptr);
            });
        }
        return;
    }
#endif
    for (int n = 0; n < N; n += 8) {
        const auto* g = reinterpret_cast<const BlockQ4x8<Min>*>(w + size_t(n / 8) * group);
        const char* ahead = n + 16 < N ? reinterpret_cast<const char*>(g + 2 * nb) : nullptr;
        for_token_tiles(A, T, nb, [&](auto rt, const ActBlock* const* a, int t) {
            x8_tile<Min, decltype(rt)::value>(g, a, nb, Y + t * ldy + n, ldy, t == 0 ? ahead : nullptr);
        });
    }
}

// Y[t][0..8) = the 8 rows of q8_0 group g . token t's 16-bit activations, for RT tokens. Per
// block: 16 pieces of 8 rows x 2 weights, each widened to int16 once for the RT tokens and
// multiplied (madd / vpdpwssd) by the token's matching 2 activations broadcast, summed in int32
// (exact: at most 32 x 128 x 32767 per block) in two chains, then converted and scaled by the 8
// rows' d times the token's d. Each row sees the same operations for any RT.
template <int RT>
inline void x8_tile16(const BlockQ8x8* g, const ActBlock16* const* a, int nb, float* Y, size_t ldy,
                      const char* ahead) {  // ahead: as x16_tile, for the group after next
    __m256 acc[RT];
    for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const BlockQ8x8& blk = g[b];
        if (ahead)
            for (size_t off = 0; off < sizeof(blk); off += 64) _mm_prefetch(ahead + b * sizeof(blk) + off, _MM_HINT_T0);
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d)));
        __m256i even[RT], odd[RT];  // pieces 2i and 2i + 1: two dependency chains per token
        for (int t = 0; t < RT; ++t) even[t] = odd[t] = _mm256_setzero_si256();
        for (int j = 0; j < 16; j += 2) {
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs + 16 * j)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs + 16 * j + 16)));
            for (int t = 0; t < RT; ++t) {
                int32_t x0, x1;
                std::memcpy(&x0, a[t][b].qs + 2 * j, 4);
                std::memcpy(&x1, a[t][b].qs + 2 * j + 2, 4);
                even[t] = dpwssd(even[t], w0, _mm256_set1_epi32(x0));
                odd[t] = dpwssd(odd[t], w1, _mm256_set1_epi32(x1));
            }
        }
        for (int t = 0; t < RT; ++t) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(even[t], odd[t]));
            acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d8, _mm256_set1_ps(a[t][b].d)), acc[t]);
        }
    }
    for (int t = 0; t < RT; ++t) _mm256_storeu_ps(Y + t * ldy, acc[t]);
}

#if FM_QUANT_VNNI
// As x8_tile16 for two groups at once (16 rows) in 512-bit vectors (bit-identical).
template <int RT>
inline void x16_tile16(const BlockQ8x8* g0, const BlockQ8x8* g1, const ActBlock16* const* a, int nb, float* Y,
                       size_t ldy, const char* ahead) {  // ahead: as x16_tile
    __m512 acc[RT];
    for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
    auto widen = [](const int8_t* p0, const int8_t* p1) {  // 16 bytes of each group -> 32 int16
        return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)), 1));
    };
    for (int b = 0; b < nb; ++b) {
        const BlockQ8x8& b0 = g0[b];
        const BlockQ8x8& b1 = g1[b];
        if (ahead)
            for (size_t off = 0; off < 2 * sizeof(b0); off += 64)
                _mm_prefetch(ahead + 2 * b * sizeof(b0) + off, _MM_HINT_T0);
        const __m512 d16 = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0.d))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1.d)), 1));
        __m512i even[RT], odd[RT];
        for (int t = 0; t < RT; ++t) even[t] = odd[t] = _mm512_setzero_si512();
        for (int j = 0; j < 16; j += 2) {
            const __m512i w0 = widen(b0.qs + 16 * j, b1.qs + 16 * j);
            const __m512i w1 = widen(b0.qs + 16 * j + 16, b1.qs + 16 * j + 16);
            for (int t = 0; t < RT; ++t) {
                int32_t x0, x1;
                std::memcpy(&x0, a[t][b].qs + 2 * j, 4);
                std::memcpy(&x1, a[t][b].qs + 2 * j + 2, 4);
                even[t] = _mm512_dpwssd_epi32(even[t], w0, _mm512_set1_epi32(x0));
                odd[t] = _mm512_dpwssd_epi32(odd[t], w1, _mm512_set1_epi32(x1));
            }
        }
        for (int t = 0; t < RT; ++t) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even[t], odd[t]));
            acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d16, _mm512_set1_ps(a[t][b].d)), acc[t]);
        }
    }
    for (int t = 0; t < RT; ++t) _mm512_storeu_ps(Y + t * ldy, acc[t]);
}
#endif

void matmul16_x8_q8_0(float* Y, size_t ldy, const ActBlock16* A, int T, const void* W, size_t row_bytes, int K,
                      int N) {
    const int nb = K / 32;
    const auto* w = static_cast<const uint8_t*>(W);
    const size_t group = 8 * row_bytes;
    int n0 = 0;
#if FM_QUANT_VNNI
    if (T >= 2)  // two groups at a time (the last one alone below where N / 8 is odd)
        for (; n0 + 16 <= N; n0 += 16) {
            const auto* g = reinterpret_cast<const BlockQ8x8*>(w + size_t(n0 / 8) * group);
            const char* ahead = n0 + 32 <= N ? reinterpret_cast<const char*>(g + 2 * nb) : nullptr;
            for_token_tiles(A, T, nb, [&](auto rt, const ActBlock16* const* a, int t) {
                x16_tile16<decltype(rt)::value>(g, g + nb, a, nb, Y + t * ldy + n0, ldy, t == 0 ? ahead : nullptr);
            });
        }
#endif
    for (int n = n0; n < N; n += 8) {
        const auto* g = reinterpret_cast<const BlockQ8x8*>(w + size_t(n / 8) * group);
        const char* ahead = n + 16 < N ? reinterpret_cast<const char*>(g + 2 * nb) : nullptr;
        for_token_tiles(A, T, nb, [&](auto rt, const ActBlock16* const* a, int t) {
            x8_tile16<decltype(rt)::value>(g, a, nb, Y + t * ldy + n, ldy, t == 0 ? ahead : nullptr);
        });
    }
}

// Decode (one or a few tokens) streams the weights from DRAM once: one row at a time, the row
// four ahead prefetched, which keeps a single sequential stream the hardware prefetcher follows
// (measured on SmolLM2: 1.2-1.6x the decode tok/s of four interleaved rows). Several tokens (a
// batch of sequences, a prefill) in a 32-block format go through tiles of rows x tokens
// (matmul_tiled); otherwise each group of four rows is reused across the tokens.
template <Format F, typename Act>
void matmul(float* Y, size_t ldy, const Act* A, int T, const void* W, size_t row_bytes, int K, int N) {
    const uint8_t* w = static_cast<const uint8_t*>(W);
    if constexpr (has_32_blocks(F) && std::is_same_v<Act, ActBlock>) {
        if (T >= 2) return matmul_tiled<F>(Y, ldy, A, T, w, row_bytes, K, N);
    } else if constexpr (has_32_blocks(F)) {
        if (T >= 2) return matmul_tiled16<F>(Y, ldy, A, T, w, row_bytes, K, N);
    }
    if (T < 4) matmul_rows<F, Act, 1, 4>(Y, ldy, A, T, w, row_bytes, K, N);
    else matmul_rows<F, Act, 4, 2>(Y, ldy, A, T, w, row_bytes, K, N);
}

// --- neuron bundles: rows given as pointers (sparse_ffn gathers them from anywhere) -------------

// out[i] = (rows[i] + offset) . a for n rows of K weights; the rows of the next group are asked
// for from memory while this one computes (they lie anywhere: the neuron cache, read buffers).
template <Format F>
void dot_ptrs(float* out, const ActBlock* a, const void* const* rows, size_t offset, int K, int n) {
    constexpr int NR = 4;
    const size_t piece = size_t(K) / format_traits(F).block * format_traits(F).block_bytes;
    const uint8_t* w[NR];
    int i = 0;
    for (; i + NR <= n; i += NR) {
        for (int r = i + NR; r < i + 2 * NR && r < n; ++r)
            for (size_t off = 0; off < piece; off += 64)
                _mm_prefetch(static_cast<const char*>(rows[r]) + offset + off, _MM_HINT_T0);
        for (int r = 0; r < NR; ++r) w[r] = static_cast<const uint8_t*>(rows[i + r]) + offset;
        dot_rows<F, NR>(w, a, K, out + i);
    }
    for (; i < n; ++i) {
        w[0] = static_cast<const uint8_t*>(rows[i]) + offset;
        dot_rows<F, 1>(w, a, K, out + i);
    }
}

// y (K) += sum_i c[i] * (rows[i] + offset), q8_0 rows: NR rows share each load and store of y,
// summed into two accumulators (even and odd rows) so that their FMAs overlap.
template <int NR>
inline void axpy_q8_0_rows(float* y, const float* c, const BlockQ8_0* const* b, int K) {
    for (int blk = 0; blk < K / 32; ++blk) {
        __m256 s[NR];
        for (int r = 0; r < NR; ++r) s[r] = _mm256_set1_ps(c[r] * f16(b[r][blk].d));
        for (int j = 0; j < 4; ++j) {
            float* yj = y + blk * 32 + 8 * j;
            __m256 acc[2] = {_mm256_loadu_ps(yj), _mm256_setzero_ps()};
            for (int r = 0; r < NR; ++r) {
                const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b[r][blk].qs + 8 * j));
                acc[r & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s[r], acc[r & 1]);
            }
            _mm256_storeu_ps(yj, _mm256_add_ps(acc[0], acc[1]));
        }
    }
}

template <Format F>
void axpy_ptrs(float* y, const float* c, const void* const* rows, size_t offset, int K, int n) {
    if constexpr (F == Format::Q8_0) {
        const BlockQ8_0* b[8];
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            for (int r = 0; r < 8; ++r)
                b[r] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(rows[i + r]) + offset);
            axpy_q8_0_rows<8>(y, c + i, b, K);
        }
        for (; i + 4 <= n; i += 4) {
            for (int r = 0; r < 4; ++r)
                b[r] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(rows[i + r]) + offset);
            axpy_q8_0_rows<4>(y, c + i, b, K);
        }
        for (; i < n; ++i) {
            b[0] = reinterpret_cast<const BlockQ8_0*>(static_cast<const uint8_t*>(rows[i]) + offset);
            axpy_q8_0_rows<1>(y, c + i, b, K);
        }
    } else {  // the other formats: a block at a time through the scalar dequantization
        const FormatTraits& t = format_traits(F);
        alignas(32) float w[256];
        for (int i = 0; i < n; ++i) {
            if (c[i] == 0.0f) continue;
            const uint8_t* row = static_cast<const uint8_t*>(rows[i]) + offset;
            const __m256 ci = _mm256_set1_ps(c[i]);
            for (int blk = 0; blk < K / t.block; ++blk) {
                dequantize(F, row + size_t(blk) * t.block_bytes, w, t.block);
                float* yb = y + blk * t.block;
                for (int k = 0; k < t.block; k += 8)
                    _mm256_storeu_ps(yb + k, _mm256_fmadd_ps(_mm256_load_ps(w + k), ci, _mm256_loadu_ps(yb + k)));
            }
        }
    }
}

// Split down columns (quant.h, axpy_split): NR columns share each load and store of y. A weight is
// its scale times its quant (minus 8 for q4_0; plus its min for q4_1), exact in f32 as ggml's
// dequantization computes it; then y += c * w.
template <Format F, int NR>
inline void axpy_split_cols(float* y, const float* c, const uint8_t* const* q, const uint16_t* const* s, int K) {
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int chunk = 0; chunk < K / 32; ++chunk) {
        for (int j = 0; j < 4; ++j) {  // elements e .. e + 7 of the chunk
            const int e = chunk * 32 + 8 * j;
            __m256 acc[2] = {_mm256_loadu_ps(y + e), _mm256_setzero_ps()};
            for (int r = 0; r < NR; ++r) {
                __m256i qi;
                if constexpr (F == Format::Q8_0) {
                    qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + e)));
                } else {  // bytes 0-7 or 8-15 of the chunk: low nibbles for j < 2, high ones after
                    const __m256i b = _mm256_cvtepu8_epi32(
                        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + chunk * 16 + 8 * (j & 1))));
                    qi = j < 2 ? _mm256_and_si256(b, low4) : _mm256_srli_epi32(b, 4);
                    if constexpr (F == Format::Q4_0) qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(8));
                }
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s[r] + e)));
                __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(qi));
                if constexpr (F == Format::Q4_1)
                    w = _mm256_add_ps(w, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s[r] + K + e))));
                acc[r & 1] = _mm256_fmadd_ps(w, _mm256_set1_ps(c[r]), acc[r & 1]);
            }
            _mm256_storeu_ps(y + e, _mm256_add_ps(acc[0], acc[1]));
        }
    }
}

template <Format F>
void axpy_split(float* y, const float* c, const void* const* rows, size_t offset, const uint16_t* const* scales, int K,
                int n) {
    const uint8_t* q[4];
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int r = 0; r < 4; ++r) q[r] = static_cast<const uint8_t*>(rows[i + r]) + offset;
        axpy_split_cols<F, 4>(y, c + i, q, scales + i, K);
    }
    for (; i < n; ++i) {
        if (c[i] == 0.0f) continue;  // a neuron this token does not use
        q[0] = static_cast<const uint8_t*>(rows[i]) + offset;
        axpy_split_cols<F, 1>(y, c + i, q, scales + i, K);
    }
}

// x (K) -> K/32 blocks of 8-bit (Q = int8_t) or 16-bit activations, rounding to nearest even.
template <typename Q>
void quantize_act(const float* x, ActBlockOf<Q>* out, int K) {
    constexpr float qmax = sizeof(Q) == 1 ? 127.0f : 32767.0f;
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
        const float d = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / qmax, id = d != 0 ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; ++i)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        // narrowing keeps the order: packs works per 128-bit lane, so the lanes are put back in order
        const __m256i q16a = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
        if constexpr (sizeof(Q) == 1) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs),
                                _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b),
                                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        } else {
            const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs), _mm256_permutevar8x32_epi32(q16a, order));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs + 16), _mm256_permutevar8x32_epi32(q16b, order));
        }
        out[b].d = d;
        out[b].s = d * float(_mm_cvtsi128_si32(s));
    }
}

}  // namespace

// Constant-initialized: no code of this file runs before the CPU is known to have its ISA.
extern const QuantKernels FM_QUANT_TABLE;
const QuantKernels FM_QUANT_TABLE = {
    FM_QUANT_ISA_NAME,
    quantize_act<int8_t>,
    {nullptr, nullptr, nullptr, matmul<Format::Q8_0, ActBlock>, matmul<Format::Q4_0, ActBlock>,
     matmul<Format::Q4_1, ActBlock>, matmul<Format::Q5_0, ActBlock>, matmul<Format::Q5_1, ActBlock>,
     matmul<Format::Q4_K, ActBlock>, matmul<Format::Q5_K, ActBlock>, matmul<Format::Q6_K, ActBlock>},
    quantize_act<int16_t>,
    {nullptr, nullptr, nullptr, matmul<Format::Q8_0, ActBlock16>, matmul<Format::Q4_0, ActBlock16>,
     matmul<Format::Q4_1, ActBlock16>, matmul<Format::Q5_0, ActBlock16>, matmul<Format::Q5_1, ActBlock16>,
     matmul<Format::Q4_K, ActBlock16>, matmul<Format::Q5_K, ActBlock16>, matmul<Format::Q6_K, ActBlock16>},
    {nullptr, nullptr, nullptr, dot_ptrs<Format::Q8_0>, dot_ptrs<Format::Q4_0>, dot_ptrs<Format::Q4_1>,
     dot_ptrs<Format::Q5_0>, dot_ptrs<Format::Q5_1>, dot_ptrs<Format::Q4_K>, dot_ptrs<Format::Q5_K>,
     dot_ptrs<Format::Q6_K>},
    {nullptr, nullptr, nullptr, axpy_ptrs<Format::Q8_0>, axpy_ptrs<Format::Q4_0>, axpy_ptrs<Format::Q4_1>,
     axpy_ptrs<Format::Q5_0>, axpy_ptrs<Format::Q5_1>, axpy_ptrs<Format::Q4_K>, axpy_ptrs<Format::Q5_K>,
     axpy_ptrs<Format::Q6_K>},
    {nullptr, nullptr, nullptr, axpy_split<Format::Q8_0>, axpy_split<Format::Q4_0>, axpy_split<Format::Q4_1>, nullptr,
     nullptr, nullptr, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, matmul_x8<Format::Q4_0>, matmul_x8<Format::Q4_1>, nullptr, nullptr, nullptr,
     nullptr, nullptr},
    {nullptr, nullptr, nullptr, matmul16_x8_q8_0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
};

}  // namespace fm::quant
