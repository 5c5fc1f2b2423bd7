// Decode GEMV over the weight formats: y (T, N) = x (T, K) W^T for T <= 8 tokens, W in its file
// layout (ggml blocks, or f32/f16/bf16), f32 activations and sums.
// Reference: fm::quant::dequantize followed by a float product (block formats), fm::gemm_ref
// (float formats); tests/test_cuda.py. Design: one warp per row of W, each lane a fixed piece of
// consecutive blocks (gemv_lanes.h: the per-lane code, which gemv_emulated also runs on the
// CPU), the weights dequantized in registers once for all tokens, then one shuffle reduction per
// token. Decode reads each weight once: the kernel is bound by W's bytes.
#include <cuda_runtime.h>

#include "kernels/cuda/checks.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/gemv_lanes.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

constexpr int kWarps = 4;  // rows per block of 128 threads

// T: the tokens' bound (1, 2, 4, 8), nt <= T the tokens in use.
template <Format F, int T>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(float* __restrict__ y, size_t ldy, const float* __restrict__ x, const uint8_t* __restrict__ W,
            size_t row_bytes, int nt, int K, int N, bool vectors) {
    const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;  // the whole warp
    lanes::Acc<T> a(nt, size_t(K));
    lanes::gemv_lane<F, T>(W + size_t(row) * row_bytes, x, K, lane, vectors, a);
#pragma unroll
    for (int t = 0; t < T; ++t)
        if (t < nt) {
            const float s = detail::warp_sum(a.v[t]);
            if (lane == t) y[size_t(t) * ldy + row] = s;
        }
}

template <Format F, int T>
void launch(float* y, size_t ldy, const float* x, const void* W, int nt, int N, int K, cudaStream_t s) {
    const bool vectors = lanes::float_vectors(F, K);
    gemv_kernel<F, T><<<(N + kWarps - 1) / kWarps, kWarps * 32, 0, s>>>(
        y, ldy, x, static_cast<const uint8_t*>(W), format_row_bytes(F, K), nt, K, N, vectors);
}

}  // namespace

void launch_gemv(Format f, float* y, size_t ldy, const float* x, const void* W, int T, int N, int K, void* stream) {
    check_gemv(f, T, N, K);
    FM_ARG(ldy >= size_t(N), "cuda gemv: ldy (", ldy, ") must be >= N (", N, ")");
    FM_ARG(detail::aligned16(x) && detail::aligned16(W), "cuda gemv: x and W must be 16-byte aligned");
    const cudaStream_t s = detail::as_stream(stream);
    lanes::with_format(f, [&](auto tag) {
        constexpr Format F = decltype(tag)::value;
        if (T == 1) launch<F, 1>(y, ldy, x, W, T, N, K, s);
        else if (T == 2) launch<F, 2>(y, ldy, x, W, T, N, K, s);
        else if (T <= 4) launch<F, 4>(y, ldy, x, W, T, N, K, s);
        else launch<F, 8>(y, ldy, x, W, T, N, K, s);
    });
    detail::check(cudaGetLastError(), "the gemv launch");
}

void gemv(Format f, float* y, const float* x, const void* W, int T, int N, int K) {
    check_gemv(f, T, N, K);
    detail::require_device("cuda gemv");
    const size_t row_bytes = format_row_bytes(f, K);
    detail::DeviceBuffer<float> dx(x, size_t(T) * K), dy(size_t(T) * N);
    detail::DeviceBuffer<uint8_t> dw(static_cast<const uint8_t*>(W), size_t(N) * row_bytes);
    launch_gemv(f, dy.get(), size_t(N), dx.get(), dw.get(), T, N, K, nullptr);
    detail::finish("gemv");
    dy.download(y, size_t(T) * N);
}

void gemv_f16(float* y, const float* x, const uint16_t* W, int N, int K) { gemv(Format::F16, y, x, W, 1, N, K); }

}  // namespace fm::cuda
