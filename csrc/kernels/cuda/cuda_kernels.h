// CUDA kernels mirroring the CPU ones. Built when CMake finds nvcc (FLASHMEM_WITH_CUDA);
// otherwise cuda_stub.cpp provides the same functions reporting that CUDA is absent.
#pragma once
#include <cstdint>

namespace fm::cuda {

bool available();  // built with CUDA and at least one device usable
// y (N) = W (N, K) x (K) with W in f16 (as raw bits); host pointers, for tests. Reference: gemm_ref.
void gemv_f16(float* y, const float* x, const uint16_t* W, int N, int K);

}  // namespace fm::cuda
