// Greedy selection on the device: the index of each row's largest logit. Reference: the greedy
// Sampler (model/sampler.cpp), std::max_element: the first of equal largest values (+0 and -0
// equal); a NaN never wins, except in position 0, where max_element keeps it (nothing compares
// larger than a NaN). Design: a block of 256 threads per row, each thread the best of its strided
// elements (strictly larger only: the lower index among its equals), then a shuffle and block
// reduction of (value, index) under "larger value, else lower index", which every order of
// combination agrees on.
#include <cuda_runtime.h>

#include <climits>

#include "kernels/cuda/checks.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

constexpr int kThreads = 256;

struct Best {
    float v;
    int i;  // INT_MAX: none yet (all NaN)
};

__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.i == INT_MAX) return a;
    if (a.i == INT_MAX) return b;
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(int32_t* __restrict__ out, const float* __restrict__ logits,
                                                          int vocab) {
    __shared__ float rv[kThreads / 32];
    __shared__ int ri[kThreads / 32];
    const float* x = logits + size_t(blockIdx.x) * vocab;
    Best best{0.f, INT_MAX};
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const float v = x[i];
        if (!isnan(v) && (best.i == INT_MAX || v > best.v)) best = {v, i};
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        best = better(best, {__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)});
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) rv[warp] = best.v, ri[warp] = best.i;
    __syncthreads();
    if (threadIdx.x == 0) {
        Best r{rv[0], ri[0]};
        for (int w = 1; w < kThreads / 32; ++w) r = better(r, {rv[w], ri[w]});
        out[blockIdx.x] = (isnan(x[0]) || r.i == INT_MAX) ? 0 : r.i;
    }
}

}  // namespace

void launch_argmax(int32_t* out, const float* logits, int T, int vocab, void* stream) {
    check_argmax(T, vocab);
    argmax_kernel<<<T, kThreads, 0, detail::as_stream(stream)>>>(out, logits, vocab);
    detail::check(cudaGetLastError(), "the argmax launch");
}

void argmax(int32_t* out, const float* logits, int T, int vocab) {
    check_argmax(T, vocab);
    detail::require_device("cuda argmax");
    detail::DeviceBuffer<float> dx(logits, size_t(T) * vocab);
    detail::DeviceBuffer<int32_t> dout{size_t(T)};
    launch_argmax(dout.get(), dx.get(), T, vocab, nullptr);
    detail::finish("argmax");
    dout.download(out, size_t(T));
}

}  // namespace fm::cuda
