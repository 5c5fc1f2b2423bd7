// The FFN's gating: out = act(g) * u, act silu or gelu_tanh. Reference: fm::gated
// (core/activation.h) and the kernel table's vector `gated` (kernels/cpu), HF's formulas:
//   silu(g)      = g / (1 + e^-g)
//   gelu_tanh(g) = 0.5 g (1 + tanh(y)) = g / (1 + e^-2y),  y = sqrt(2/pi) (g + 0.044715 g^3)
// the second form as the vector CPU kernel takes it (no cancellation of 1 + tanh(y) for g below
// about -5). expf is CUDA's full-precision one (2 ulp); a grid-stride loop, out may be g.
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

template <Activation A>
__global__ void gated_kernel(float* out, const float* g, const float* __restrict__ u, size_t n) {
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float x = g[i];
        float a;
        if (A == Activation::SiLU) {
            a = x / (1.0f + expf(-x));
        } else {
            const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            a = x / (1.0f + expf(-2.0f * y));
        }
        out[i] = a * u[i];
    }
}

}  // namespace

void launch_gated(Activation act, float* out, const float* g, const float* u, size_t n, void* stream) {
    FM_ARG(act == Activation::SiLU || act == Activation::GeluTanh, "cuda gated: unknown activation ", int(act));
    if (n == 0) return;
    const size_t blocks = (n + 255) / 256;
    const unsigned grid = unsigned(blocks < 4096 ? blocks : 4096);
    const cudaStream_t s = detail::as_stream(stream);
    if (act == Activation::SiLU) gated_kernel<Activation::SiLU><<<grid, 256, 0, s>>>(out, g, u, n);
    else gated_kernel<Activation::GeluTanh><<<grid, 256, 0, s>>>(out, g, u, n);
    detail::check(cudaGetLastError(), "the gated launch");
}

void gated(Activation act, float* out, const float* g, const float* u, size_t n) {
    FM_ARG(act == Activation::SiLU || act == Activation::GeluTanh, "cuda gated: unknown activation ", int(act));
    detail::require_device("cuda gated");
    detail::DeviceBuffer<float> dg(g, n), du(u, n);
    launch_gated(act, dg.get(), dg.get(), du.get(), n, nullptr);
    detail::finish("gated");
    dg.download(out, n);
}

}  // namespace fm::cuda
