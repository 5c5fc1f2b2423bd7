// Kernels for weights in ggml's block formats (blocks.h), the way ggml computes with them: the
// activations are quantized to 8 bits per block of 32 (quantize_act) and each weight block's
// dot product is accumulated in integers, then scaled once per block. A table per instruction
// set (AVX2; AVX-512 VNNI), chosen at run time like the float kernels (FLASHMEM_ISA=avx2 forces
// AVX2); each kernel has a scalar reference below, which the tests compare against.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/format.h"
#include "kernels/quant/blocks.h"

namespace fm::quant {

struct QuantKernels {
    const char* isa;
    // out (K/32 blocks) = x (K) quantized; K a multiple of 32.
    void (*quantize_act)(const float* x, ActBlock* out, int K);
    // Y[t*ldy + n] = sum_k W[n, k] * A[t, k] for t < T, n < N. W: N rows of K weights in the
    // format, `row_bytes` apart; A: T tokens of K/32 activation blocks each. nullptr for the
    // float formats (kernels/cpu/kernels.h computes those).
    void (*matmul[kFormats])(float* Y, size_t ldy, const ActBlock* A, int T, const void* W, size_t row_bytes, int K,
                             int N);
    // The same with 16-bit activations: as precise as f32 for what the logits can tell apart.
    void (*quantize_act16)(const float* x, ActBlock16* out, int K);
    void (*matmul16[kFormats])(float* Y, size_t ldy, const ActBlock16* A, int T, const void* W, size_t row_bytes,
                               int K, int N);
    // Neuron bundles (ffn/bundled_ffn.h), their rows given as pointers, each piece at `offset`:
    // out[i] = (rows[i] + offset) . a, K weights in the format, for i < n (gate and up);
    void (*dot_ptrs[kFormats])(float* out, const ActBlock* a, const void* const* rows, size_t offset, int K, int n);
    // y (K) += sum_i c[i] * (rows[i] + offset), for i < n (down columns).
    void (*axpy_ptrs[kFormats])(float* y, const float* c, const void* const* rows, size_t offset, int K, int n);
    // The same for split down columns (ffn/bundled_ffn.h, BundleFormat::down_split): column i's
    // quants at rows[i] + offset, its K scales (then K mins, q4_1) at scales[i], f16; q4_0, q4_1 and
    // q8_0, nullptr for the others.
    void (*axpy_split[kFormats])(float* y, const float* c, const void* const* rows, size_t offset,
                                 const uint16_t* const* scales, int K, int n);
    // matmul for a q4_0 or q4_1 matrix whose rows repack_x8 interleaved (N a multiple of 8; W
    // and Y at a group of 8 rows); nullptr for the other formats.
    void (*matmul_x8[kFormats])(float* Y, size_t ldy, const ActBlock* A, int T, const void* W, size_t row_bytes,
                                int K, int N);
    // The same with 16-bit activations, for a q8_0 matrix (the LM head); nullptr for the others.
    void (*matmul16_x8[kFormats])(float* Y, size_t ldy, const ActBlock16* A, int T, const void* W, size_t row_bytes,
                                  int K, int N);
};

// Whether repack_x8 takes matrices of format f (q4_0, q4_1, q8_0) with `rows` rows.
bool can_repack_x8(Format f, int64_t rows);
// Interleaves each group of 8 rows of an (rows, K) q4_0, q4_1 or q8_0 matrix in place, so that a
// kernel's 8 float lanes are the 8 rows (blocks.h: BlockQ4x8, BlockQ8x8); the matrix keeps its
// size, and group g its bytes [8g * row_bytes, 8(g + 1) * row_bytes).
void repack_x8(Format f, void* data, int64_t rows, int K);
// Row r of such a matrix (data: its first group) as its blocks were before repack_x8, into `row`
// (row bytes): what an embedding lookup reads from an interleaved LM head.
void row_from_x8(Format f, const void* data, int64_t r, int K, void* row);

const QuantKernels& quant_kernels();  // the best for this CPU
const QuantKernels* quant_kernels_avx2();    // nullptr where the CPU lacks the ISA
const QuantKernels* quant_kernels_avx512();  // AVX-512 with VNNI
// "best", "avx2" or "avx512": nullptr where the CPU lacks it; an error for another name.
const QuantKernels* quant_kernels_for(const std::string& isa);

// y (n) = n weights in the block format f, n a multiple of its block; bit-exact with ggml (and
// gguf-py's dequantize). Scalar: it serves the few rows a token gathers (embeddings).
void dequantize(Format f, const void* src, float* y, int64_t n);

// Scalar references. matmul_ref accumulates the dequantized weights times the dequantized
// activations in double.
template <typename Q>
void quantize_act_ref(const float* x, ActBlockOf<Q>* out, int K);
template <typename Q>
void matmul_ref(Format f, float* Y, size_t ldy, const ActBlockOf<Q>* A, int T, const void* W, size_t row_bytes, int K,
                int N);
void dot_ptrs_ref(Format f, float* out, const ActBlock* a, const void* const* rows, size_t offset, int K, int n);
void axpy_ptrs_ref(Format f, float* y, const float* c, const void* const* rows, size_t offset, int K, int n);
void axpy_split_ref(Format f, float* y, const float* c, const void* const* rows, size_t offset,
                    const uint16_t* const* scales, int K, int n);

}  // namespace fm::quant
