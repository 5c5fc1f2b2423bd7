// AVX-512 (F, BW, VL) instantiation of kernels_impl.inc. Compiled with -mavx512f -mavx512bw
// -mavx512vl -mfma -mf16c; only called after a run-time check of the CPU.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace fm::avx512 {

struct V {
    using R = __m512;
    static constexpr int W = 16;
    static __mmask16 mask(int n) { return __mmask16((1u << n) - 1); }
    static R zero() { return _mm512_setzero_ps(); }
    static R set1(float a) { return _mm512_set1_ps(a); }
    static R add(R a, R b) { return _mm512_add_ps(a, b); }
    static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
    static R max(R a, R b) { return _mm512_max_ps(a, b); }
    static R min(R a, R b) { return _mm512_min_ps(a, b); }
    static R div(R a, R b) { return _mm512_div_ps(a, b); }
    static R select_neg(R x, R a, R b) {  // x < 0 (sign set) ? b : a
        return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(x)), a, b);
    }
    static float hmax(R v) { return _mm512_reduce_max_ps(v); }
    static R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static R pow2i(R n) { return _mm512_scalef_ps(_mm512_set1_ps(1.0f), n); }  // 2^n for integral n
    static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static float hsum(R v) { return _mm512_reduce_add_ps(v); }
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    static R load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
    static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
    static void store_tail(float* p, R v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
    static R load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static R load_f16_tail(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
    static void store_f16(uint16_t* p, R v) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static void store_f16_tail(uint16_t* p, R v, int n) {
        _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static R widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static R load_bf16(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
    static R load_bf16_tail(const uint16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
};

constexpr const char* kIsaName = "avx512";
#include "kernels/cpu/kernels_impl.inc"

}  // namespace fm::avx512

