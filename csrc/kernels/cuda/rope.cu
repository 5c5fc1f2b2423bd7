// Rotary embedding, in place. Reference: fm::rope (kernels/cpu/ops.h), HF's "rotate_half": the
// pairs (i, i + head_dim / 2) of each head, with token t's cos and sin tables (head_dim / 2):
//   p[i] = x1 cos - x2 sin,  p[i + half] = x2 cos + x1 sin   (x1 = p[i], x2 = p[i + half])
// each product and sum rounded on its own (__fmul_rn, __fadd_rn: no fused multiply-add), as the
// CPU computes it: bit-exact. One thread per pair, T * n_heads * half of them.
#include <cuda_runtime.h>

#include "kernels/cuda/checks.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

__global__ void rope_kernel(float* v, size_t ld, int n_heads, int half, size_t pairs, const float* __restrict__ cs,
                            const float* __restrict__ sn) {
    for (size_t j = size_t(blockIdx.x) * blockDim.x + threadIdx.x; j < pairs; j += size_t(gridDim.x) * blockDim.x) {
        const int i = int(j % half);
        const size_t th = j / half;  // token t, head h
        const int h = int(th % n_heads);
        const size_t t = th / n_heads;
        float* p = v + t * ld + size_t(h) * 2 * half;
        const float c = cs[t * half + i], s = sn[t * half + i];
        const float x1 = p[i], x2 = p[i + half];
        p[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        p[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
}

}  // namespace

void launch_rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin,
                 void* stream) {
    check_rope(T, ld, n_heads, head_dim);
    const int half = head_dim / 2;
    const size_t pairs = size_t(T) * n_heads * half, blocks = (pairs + 255) / 256;
    rope_kernel<<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, detail::as_stream(stream)>>>(v, ld, n_heads, half,
                                                                                                 pairs, cos, sin);
    detail::check(cudaGetLastError(), "the rope launch");
}

void rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin) {
    check_rope(T, ld, n_heads, head_dim);
    detail::require_device("cuda rope");
    const size_t n = size_t(T) * ld, tables = size_t(T) * (head_dim / 2);
    detail::DeviceBuffer<float> dv(v, n), dc(cos, tables), ds(sin, tables);
    launch_rope(dv.get(), T, ld, n_heads, head_dim, dc.get(), ds.get(), nullptr);
    detail::finish("rope");
    dv.download(v, n);
}

}  // namespace fm::cuda
