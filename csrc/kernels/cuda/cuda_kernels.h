// CUDA kernels mirroring the CPU ones, through host pointers: each call copies its inputs to the
// device, runs the kernel and copies the result back (for tests and tools; launch.h has the same
// kernels over device memory, for a CUDA backend). Built when CMake finds nvcc; otherwise
// cuda_stub.cpp provides every function, raising that the build has no CUDA.
//
// Errors: arguments are checked first (checks.h; std::invalid_argument, Python ValueError, naming
// the argument), on every build, before any device is touched; then a build without CUDA, a
// machine without a device and any CUDA error raise std::runtime_error (Python RuntimeError).
// Nothing exits or aborts.
//
// Each kernel's CPU reference:
//   gemv              fm::quant::dequantize + a float product (block formats), fm::gemm_ref (float)
//   rmsnorm, add      fm::rmsnorm (kernels/cpu/ops.h), CpuBackend::add
//   rope              fm::rope (kernels/cpu/ops.h)
//   gated             fm::gated (core/activation.h) and the kernel table's `gated`
//   attention_decode  attention_decode_ref below (CpuBackend::attention's math)
//   argmax            Sampler's greedy choice (model/sampler.cpp): the first largest logit
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/activation.h"
#include "core/dtype.h"
#include "core/format.h"

namespace fm::cuda {

constexpr int kMaxGemvTokens = 8;   // gemv: tokens per call (decode)
constexpr int kMaxHeadDim = 256;    // attention_decode
constexpr int kMaxAttnChunk = 256;  // attention_decode: positions per split

bool built();      // compiled with nvcc
bool available();  // built, and at least one device usable

// y (T, N) = x (T, K) W^T: W is N rows of K weights in format f, each format_row_bytes(f, K)
// bytes (a GGUF tensor's bytes for the block formats; f16/bf16 as raw bits). 1 <= T <= 8; K a
// multiple of the format's block.
void gemv(Format f, float* y, const float* x, const void* W, int T, int N, int K);
// y (N) = W (N, K) x (K) with W in f16 (raw bits): gemv(Format::F16, ...) with one token.
void gemv_f16(float* y, const float* x, const uint16_t* W, int N, int K);

// y (rows, d) = x / sqrt(mean(x^2) + eps) * w per row (y may be x).
void rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps);
// x (n) += y (n): the residual add.
void add(float* x, const float* y, size_t n);
// Rotary embedding in place: v is T rows `ld` floats apart, each n_heads heads of head_dim (even)
// at its start; cos, sin: (T, head_dim / 2). Pairs (i, i + head_dim / 2) of each head.
void rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin);
// out (n) = act(g) * u (out may be g).
void gated(Activation act, float* out, const float* g, const float* u, size_t n);

// Decode attention of B sequences, one query each: q (B, n_heads, head_dim); the sequence b's
// keys and values are rows [0, lengths[b]) of (rows, n_kv_heads * head_dim) in kv_dtype (f32 or
// f16), sequence b's at row b * rows: a KvCache layer's slots 0..B-1. Head h reads KV head
// h / (n_heads / n_kv_heads); out (B, n_heads, head_dim) = softmax(scale * K q) V. The positions
// are split in chunks of `chunk` (0: kMaxAttnChunk) computed apart and then combined.
void attention_decode(float* out, const float* q, const void* k, const void* v, DType kv_dtype, const int32_t* lengths,
                      int B, int rows, int n_heads, int n_kv_heads, int head_dim, float scale, int chunk = 0);

// out (T) = index of the largest of each row of logits (T, vocab), the first of equals; NaNs are
// skipped except in position 0, which then wins (std::max_element, as the greedy sampler).
void argmax(int32_t* out, const float* logits, int T, int vocab);

// Scalar references and emulations (reference.cpp, built with or without CUDA):
// attention_decode in double precision, one sequence and head at a time.
void attention_decode_ref(float* out, const float* q, const void* k, const void* v, DType kv_dtype,
                          const int32_t* lengths, int B, int rows, int n_heads, int n_kv_heads, int head_dim,
                          float scale);
// gemv's kernel run on the CPU: the same per-lane code (gemv_lanes.h) for each of a warp's 32
// lanes, their sums added as the warp's shuffle tree adds them. Checks the kernel's indexing of
// every format's blocks where no GPU is at hand.
void gemv_emulated(Format f, float* y, const float* x, const void* W, int T, int N, int K);

}  // namespace fm::cuda
