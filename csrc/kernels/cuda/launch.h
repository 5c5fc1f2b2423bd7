// The CUDA kernels over device memory, for a CUDA backend: each call checks its arguments
// (checks.h), queues the kernel on `stream` (a cudaStream_t; nullptr: the default stream) and
// returns; a launch error raises std::runtime_error. Defined only when the build has CUDA
// (cuda_kernels.h's built()); the host-pointer entry points of cuda_kernels.h call these.
// Pointers as in cuda_kernels.h, but in device memory.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/activation.h"
#include "core/dtype.h"
#include "core/format.h"

namespace fm::cuda {

// y (T, ldy apart) = x (T, K) W^T; x and W 16-byte aligned.
void launch_gemv(Format f, float* y, size_t ldy, const float* x, const void* W, int T, int N, int K, void* stream);
void launch_rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps, void* stream);
void launch_add(float* x, const float* y, size_t n, void* stream);
void launch_rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin,
                 void* stream);
void launch_gated(Activation act, float* out, const float* g, const float* u, size_t n, void* stream);
// Floats of scratch launch_attention_decode needs (the chunks' partial outputs, maxima and sums).
size_t attention_scratch_floats(int B, int rows, int n_heads, int head_dim, int chunk);
// lengths: device memory, each in [1, rows] (not checked: the caller's).
void launch_attention_decode(float* out, const float* q, const void* k, const void* v, DType kv_dtype,
                             const int32_t* lengths, int B, int rows, int n_heads, int n_kv_heads, int head_dim,
                             float scale, int chunk, float* scratch, void* stream);
void launch_argmax(int32_t* out, const float* logits, int T, int vocab, void* stream);

}  // namespace fm::cuda
