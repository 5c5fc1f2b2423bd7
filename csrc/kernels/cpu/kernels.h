// CPU kernels, chosen once at run time for the best instruction set this CPU has
// (AVX-512 where present, else AVX2+FMA+F16C). Each has a scalar reference in reference.cpp,
// which tests compare against (tests/test_kernels.py).
//
// Layout contract: row-major; a matrix W of N rows has row n at W + n*ldw elements of its dtype.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/activation.h"
#include "core/dtype.h"

namespace fm {

// Rows of W that the matrix-matrix kernels convert to f32 at a time; scratch buffers passed
// to them hold kScratchRows * round_up(K, 16) floats.
constexpr int kScratchRows = 16;
inline size_t scratch_floats(int K) { return size_t(kScratchRows) * ((K + 15) / 16 * 16); }

struct Kernels {
    const char* isa;
    // Y[t*ldy + n] = sum_k X[t*ldx + k] * W[n*ldw + k], for t < T, n < N.
    void (*gemm[3])(float* Y, size_t ldy, const float* X, size_t ldx, int T, const void* W, size_t ldw,
                    int K, int N, float* scratch);
    // Y[t*ldy + d] += sum_j A[t*lda + j] * B[j*ldb + d], for t < T, d < D, j < NB.
    void (*accumulate[3])(float* Y, size_t ldy, const float* A, size_t lda, int T, const void* B,
                          size_t ldb, int D, int NB, float* scratch);
    // dst[i] = (float)src[i]
    void (*to_f32[3])(float* dst, const void* src, int n);
    // dst[i] = src[i] as f16 bits, rounded to nearest even (reference: f32_to_f16 in core/dtype.h)
    void (*to_f16)(uint16_t* dst, const float* src, int n);
    float (*dot)(const float* a, const float* b, int n);
    void (*softmax)(float* x, int n, float scale);           // x = softmax(scale * x), in place
    float (*l2sq)(const float* a, const float* b, int n);    // sum (a-b)^2
    // sum of z[k] for the k < n whose bit is set (bit k = bits[k/8] >> (k%8) & 1)
    float (*bit_sum)(const uint8_t* bits, const float* z, int n);
    // the same with z in int8 (each |z[k]| <= 127): the predictor's kernel
    int32_t (*bit_sum_i8)(const uint8_t* bits, const int8_t* z, int n);
    // The index of the first largest of x[0..n), as std::max_element (reference) finds it: a NaN
    // never wins, except in position 0, which then does. Greedy sampling's pick.
    int32_t (*argmax)(const float* x, int n);
    // Decode attention of G query heads sharing one KV head over n = len[0] + len[1] positions held
    // as two runs of rows, K[0] and V[0] (len[0] rows), then K[1] and V[1] (a ring that wraps), rows
    // ld elements apart: O (G, hd) = softmax(scale * Q K^T) V, Q (G, hd); scores in S (G rows, lds
    // apart, lds >= n).
    void (*attend[3])(float* O, const float* Q, int G, int hd, const void* const* K, const void* const* V,
                      const int* len, size_t ld, float scale, float* S, size_t lds);
    // Decode gated FFN over n neuron bundles, rows[i] = [gate_i | up_i | down_i] (each d_model long):
    // y (d_model) += sum_i act(gate_i . x) * (up_i . x) * down_i.
    void (*ffn_decode[3])(float* y, const float* x, const void* const* rows, int d_model, int n, Activation act);
    // h = act(h) * u, in place (h: the gate's outputs); reference: gated() in core/activation.h.
    void (*gated)(float* h, const float* u, int n, Activation act);
};

const Kernels& kernels();  // the best for this CPU
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();  // nullptr where the CPU lacks AVX-512

// Scalar references (double accumulation), for tests.
void gemm_ref(float* Y, size_t ldy, const float* X, size_t ldx, int T, const void* W, DType dt, size_t ldw,
              int K, int N);
void ffn_decode_ref(float* y, const float* x, const void* const* rows, DType dt, int d_model, int n, Activation act);
void softmax_ref(float* x, int n, float scale);
float bit_sum_ref(const uint8_t* bits, const float* z, int n);
int32_t bit_sum_i8_ref(const uint8_t* bits, const int8_t* z, int n);
int32_t argmax_ref(const float* x, int n);
void accumulate_ref(float* Y, size_t ldy, const float* A, size_t lda, int T, const void* B, DType dt,
                    size_t ldb, int D, int NB);

}  // namespace fm
