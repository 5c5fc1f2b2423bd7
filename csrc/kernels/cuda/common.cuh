// What the CUDA kernel files share: error checks (every CUDA error raises std::runtime_error,
// nothing aborts), device buffers for the host-pointer entry points, and warp and block
// reductions.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "core/error.h"

namespace fm::cuda::detail {

inline void check(cudaError_t e, const char* what) {
    FM_IO(e == cudaSuccess, "CUDA error in ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Raises unless a device is usable; `what` names the entry point (device.cu).
void require_device(const char* what);

// A launch's errors: its configuration at once, the kernel's own (a bad address) once it ends.
inline void finish(const char* what) {
    check(cudaGetLastError(), what);
    check(cudaDeviceSynchronize(), what);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline bool aligned16(const void* p) { return reinterpret_cast<size_t>(p) % 16 == 0; }

// n elements of T in device memory, freed when it goes (cudaMalloc: 256-byte aligned).
template <typename T>
class DeviceBuffer {
  public:
    explicit DeviceBuffer(size_t n) {
        if (n) check(cudaMalloc(&p_, n * sizeof(T)), "cudaMalloc");
    }
    DeviceBuffer(const T* host, size_t n) : DeviceBuffer(n) { upload(host, n); }
    ~DeviceBuffer() {
        if (p_) cudaFree(p_);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    T* get() const { return p_; }
    void upload(const T* host, size_t n) {
        if (n) check(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice), "a copy to the device");
    }
    void download(T* host, size_t n) const {
        if (n) check(cudaMemcpy(host, p_, n * sizeof(T), cudaMemcpyDeviceToHost), "a copy from the device");
    }

  private:
    T* p_ = nullptr;
};

struct Sum {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Over the warp's 32 lanes (all active), the result in every lane.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }

// Over the block (blockDim.x a multiple of 32; every thread calls it), the result in every
// thread, the same in all. red: shared, >= blockDim.x / 32 elements.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* red) {
    v = warp_reduce(v, op);
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // red is free: the last reduction's reads are done
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    T r = red[0];
    for (int i = 1; i < nw; ++i) r = op(r, red[i]);
    return r;
}

}  // namespace fm::cuda::detail
