// y = W x with W in f16: one warp per row, lanes striding over K, warp-shuffle reduction.
// Reference: fm::gemm_ref (csrc/kernels/cpu/reference.cpp); test: tests/test_kernels.py.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::cuda {

namespace {

void check(cudaError_t e, const char* what) {
    FM_IO(e == cudaSuccess, "CUDA error in ", what, ": ", cudaGetErrorString(e));
}

__global__ void gemv_f16_kernel(float* __restrict__ y, const float* __restrict__ x, const __half* __restrict__ W,
                                int N, int K) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= N) return;
    const __half* w = W + size_t(row) * K;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += __half2float(w[k]) * x[k];
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) y[row] = acc;
}

template <typename T>
struct DeviceBuffer {
    T* p = nullptr;
    explicit DeviceBuffer(size_t n) { check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc"); }
    ~DeviceBuffer() { cudaFree(p); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace

bool available() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void gemv_f16(float* y, const float* x, const uint16_t* W, int N, int K) {
    FM_ARG(available(), "no CUDA device is available");
    DeviceBuffer<float> dy(N), dx(K);
    DeviceBuffer<__half> dw(size_t(N) * K);
    check(cudaMemcpy(dx.p, x, sizeof(float) * K, cudaMemcpyHostToDevice), "copy x");
    check(cudaMemcpy(dw.p, W, sizeof(uint16_t) * size_t(N) * K, cudaMemcpyHostToDevice), "copy W");
    const int warps_per_block = 8;
    gemv_f16_kernel<<<(N + warps_per_block - 1) / warps_per_block, warps_per_block * 32>>>(dy.p, dx.p, dw.p, N, K);
    check(cudaGetLastError(), "gemv_f16 launch");
    check(cudaMemcpy(y, dy.p, sizeof(float) * N, cudaMemcpyDeviceToHost), "copy y");
}

}  // namespace fm::cuda
