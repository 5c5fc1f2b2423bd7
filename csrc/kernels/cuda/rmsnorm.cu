// RMSNorm over rows and the residual add.
// rmsnorm reference: fm::rmsnorm (kernels/cpu/ops.h): out = w * (x * inv), inv = 1 / sqrt(float(
// sum x^2 / d) + eps), the sum of squares in double as the CPU takes it, so that the outputs
// match it to the rounding of float(ss / d) (in practice bit for bit). One block of 256 threads
// per row: strided loads, a block reduction, then each thread scales the elements it read (y may
// be x). add reference: CpuBackend::add (x += y), bit-exact; a grid-stride loop.
#include <cuda_runtime.h>

#include "kernels/cuda/checks.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
rmsnorm_kernel(float* y, const float* x, const float* __restrict__ w, int d, float eps) {
    __shared__ double red[kNormThreads / 32];
    const float* xr = x + size_t(blockIdx.x) * d;
    float* yr = y + size_t(blockIdx.x) * d;
    double ss = 0;
    for (int i = threadIdx.x; i < d; i += kNormThreads) ss += double(xr[i]) * double(xr[i]);
    ss = detail::block_reduce(ss, detail::Sum{}, red);
    const float inv = 1.0f / sqrtf(float(ss / d) + eps);  // IEEE division and root (no fast math)
    for (int i = threadIdx.x; i < d; i += kNormThreads) yr[i] = __fmul_rn(w[i], __fmul_rn(xr[i], inv));
}

__global__ void add_kernel(float* x, const float* __restrict__ y, size_t n) {
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

}  // namespace

void launch_rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps, void* stream) {
    check_rmsnorm(rows, d, eps);
    rmsnorm_kernel<<<rows, kNormThreads, 0, detail::as_stream(stream)>>>(y, x, w, d, eps);
    detail::check(cudaGetLastError(), "the rmsnorm launch");
}

void launch_add(float* x, const float* y, size_t n, void* stream) {
    if (n == 0) return;
    const size_t blocks = (n + 255) / 256;
    add_kernel<<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, detail::as_stream(stream)>>>(x, y, n);
    detail::check(cudaGetLastError(), "the add launch");
}

void rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps) {
    check_rmsnorm(rows, d, eps);
    detail::require_device("cuda rmsnorm");
    const size_t n = size_t(rows) * d;
    detail::DeviceBuffer<float> dx(x, n), dw(w, size_t(d)), dy(n);
    launch_rmsnorm(dy.get(), dx.get(), dw.get(), rows, d, eps, nullptr);
    detail::finish("rmsnorm");
    dy.download(y, n);
}

void add(float* x, const float* y, size_t n) {
    detail::require_device("cuda add");
    detail::DeviceBuffer<float> dx(x, n), dy(y, n);
    launch_add(dx.get(), dy.get(), n, nullptr);
    detail::finish("add");
    dx.download(x, n);
}

}  // namespace fm::cuda
