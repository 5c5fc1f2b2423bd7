// AVX2 + FMA + F16C instantiation of kernels_impl.inc: the minimum the engine needs.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace fm::avx2 {

struct V {
    using R = __m256;
    static constexpr int W = 8;
    static R zero() { return _mm256_setzero_ps(); }
    static R set1(float a) { return _mm256_set1_ps(a); }
    static R add(R a, R b) { return _mm256_add_ps(a, b); }
    static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
    static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
    static R max(R a, R b) { return _mm256_max_ps(a, b); }
    static R min(R a, R b) { return _mm256_min_ps(a, b); }
    static R div(R a, R b) { return _mm256_div_ps(a, b); }
    static R select_neg(R x, R a, R b) { return _mm256_blendv_ps(a, b, x); }  // x < 0 (sign set) ? b : a
    static float hmax(R v) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static R pow2i(R n) {  // 2^n for integral n in [-126, 127]
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    }
    static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
    static float hsum(R v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_hadd_ps(s, s);
        return _mm_cvtss_f32(_mm_hadd_ps(s, s));
    }
    static R load(const float* p) { return _mm256_loadu_ps(p); }
    static R load_tail(const float* p, int n) {
        float t[8] = {};
        std::memcpy(t, p, n * sizeof(float));
        return _mm256_loadu_ps(t);
    }
    static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
    static void store_tail(float* p, R v, int n) {
        float t[8];
        _mm256_storeu_ps(t, v);
        std::memcpy(p, t, n * sizeof(float));
    }
    static __m128i load8(const uint16_t* p, int n) {
        uint16_t t[8] = {};
        std::memcpy(t, p, n * 2);
        return _mm_loadu_si128((const __m128i*)t);
    }
    static R load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static void store_f16(uint16_t* p, R v) { _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
    static void store_f16_tail(uint16_t* p, R v, int n) {
        uint16_t t[8];
        store_f16(t, v);
        std::memcpy(p, t, n * 2);
    }
    static R load_f16_tail(const uint16_t* p, int n) { return _mm256_cvtph_ps(load8(p, n)); }
    static R widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
    static R load_bf16(const uint16_t* p) { return widen_bf16(_mm_loadu_si128((const __m128i*)p)); }
    static R load_bf16_tail(const uint16_t* p, int n) { return widen_bf16(load8(p, n)); }
};

constexpr const char* kIsaName = "avx2";
#include "kernels/cpu/kernels_impl.inc"

}  // namespace fm::avx2

