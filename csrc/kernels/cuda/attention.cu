// GQA decode attention, split over the sequence (flash-decoding). One query per sequence:
//   out[b, h] = softmax(scale * K q[b, h]) V   over positions [0, lengths[b]) of KV head
//   h / (n_heads / n_kv_heads), K and V rows of sequence b at row b * rows (a KvCache layer's
//   slots), f32 or f16.
// Reference: attention_decode_ref (reference.cpp), double precision, which is the math of
// CpuBackend::attention (backend/cpu_backend.cpp): scores q . k in f32, softmax(scale * scores),
// out = sum p v.
// Design: attention_chunks runs a block of 128 threads per (chunk of `chunk` positions, head,
// sequence): the query in shared memory, a warp per position for the scores (lanes across
// head_dim: coalesced rows, shuffle sums), the chunk's max m and sum l of e^(s - m) by block
// reductions, then the chunk's output sum_p e^(s_p - m) v_p by threads across head_dim (groups
// of head_dim threads over interleaved positions when head_dim <= 64). attention_combine then
// weighs the chunks by e^(m_c - M) (M their max): out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c.
// The heads of a group read the same K and V rows, from L2 after the first.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/checks.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/launch.h"

namespace fm::cuda {

namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// part_o (B, n_heads, max_chunks, hd); part_ml (B, n_heads, max_chunks, 2): each chunk's m and l.
template <typename KV>
__global__ void __launch_bounds__(kThreads)
attention_chunks(float* __restrict__ part_o, float* __restrict__ part_ml, const float* __restrict__ q,
                 const KV* __restrict__ k, const KV* __restrict__ v, const int32_t* __restrict__ lengths, int rows,
                 int n_heads, int group, int hd, float scale, int chunk, int max_chunks) {
    __shared__ float qs[kMaxHeadDim];
    __shared__ float sc[kMaxAttnChunk];  // the chunk's scores, then e^(s - m)
    __shared__ float po[kThreads];       // per position group: partial outputs
    __shared__ float red[kThreads / 32];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int p0 = c * chunk, len = lengths[b];
    if (p0 >= len) return;  // the whole block: this sequence has fewer chunks
    const int n = min(chunk, len - p0);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t kv_dim = size_t(n_heads / group) * hd;
    const size_t at = (size_t(b) * rows + p0) * kv_dim + size_t(h / group) * hd;  // first row, this KV head
    const KV* kc = k + at;
    const KV* vc = v + at;

    const float* qh = q + (size_t(b) * n_heads + h) * hd;
    for (int d = tid; d < hd; d += kThreads) qs[d] = qh[d];
    __syncthreads();

    for (int i = warp; i < n; i += kThreads / 32) {  // scores: a warp per position
        const KV* kr = kc + size_t(i) * kv_dim;
        float s = 0.f;
        for (int d = lane; d < hd; d += 32) s += qs[d] * to_float(kr[d]);
        s = detail::warp_sum(s);
        if (lane == 0) sc[i] = s * scale;
    }
    __syncthreads();

    float m = -INFINITY;
    for (int i = tid; i < n; i += kThreads) m = fmaxf(m, sc[i]);
    m = detail::block_reduce(m, detail::Max{}, red);
    float l = 0.f;
    for (int i = tid; i < n; i += kThreads) {
        const float e = expf(sc[i] - m);
        sc[i] = e;
        l += e;
    }
    l = detail::block_reduce(l, detail::Sum{}, red);  // its barriers also publish sc

    const size_t slot = (size_t(b) * n_heads + h) * max_chunks + c;
    float* out = part_o + slot * hd;
    if (hd <= kThreads / 2) {  // ng groups of hd threads, group g over positions g, g + ng, ...
        const int ng = kThreads / hd, g = tid / hd, d = tid % hd;
        if (g < ng) {
            float o = 0.f;
            for (int i = g; i < n; i += ng) o += sc[i] * to_float(vc[size_t(i) * kv_dim + d]);
            po[tid] = o;  // = po[g * hd + d]
        }
        __syncthreads();
        if (tid < hd) {
            float o = 0.f;
            for (int j = 0; j < ng; ++j) o += po[j * hd + tid];
            out[tid] = o;
        }
    } else {
        for (int d = tid; d < hd; d += kThreads) {
            float o = 0.f;
            for (int i = 0; i < n; ++i) o += sc[i] * to_float(vc[size_t(i) * kv_dim + d]);
            out[d] = o;
        }
    }
    if (tid == 0) {
        part_ml[2 * slot] = m;
        part_ml[2 * slot + 1] = l;
    }
}

// A block of 128 threads per (head, sequence); thread t takes dimensions t and t + 128.
__global__ void __launch_bounds__(kThreads)
attention_combine(float* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_ml,
                  const int32_t* __restrict__ lengths, int n_heads, int hd, int chunk, int max_chunks) {
    __shared__ float wsh[kThreads];  // e^(m_c - M) of a tile of chunks
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int nc = (lengths[b] + chunk - 1) / chunk;
    const size_t first = (size_t(b) * n_heads + h) * max_chunks;
    float M = -INFINITY;
    for (int c = 0; c < nc; ++c) M = fmaxf(M, part_ml[2 * (first + c)]);
    float L = 0.f, o0 = 0.f, o1 = 0.f;
    const int d0 = tid, d1 = tid + kThreads;
    for (int c0 = 0; c0 < nc; c0 += kThreads) {
        const int nt = min(kThreads, nc - c0);
        __syncthreads();  // the last tile's weights are read
        if (tid < nt) wsh[tid] = expf(part_ml[2 * (first + c0 + tid)] - M);
        __syncthreads();
        for (int j = 0; j < nt; ++j) {
            const float w = wsh[j];
            const float* po = part_o + (first + c0 + j) * hd;
            L += w * part_ml[2 * (first + c0 + j) + 1];
            if (d0 < hd) o0 += w * po[d0];
            if (d1 < hd) o1 += w * po[d1];
        }
    }
    float* o = out + (size_t(b) * n_heads + h) * hd;
    if (d0 < hd) o[d0] = o0 / L;
    if (d1 < hd) o[d1] = o1 / L;
}

int max_chunks_of(int rows, int chunk) { return (rows + chunk - 1) / chunk; }

}  // namespace

size_t attention_scratch_floats(int B, int rows, int n_heads, int head_dim, int chunk) {
    if (chunk == 0) chunk = kMaxAttnChunk;
    FM_ARG(B >= 1 && rows >= 1 && n_heads >= 1 && head_dim >= 1 && chunk >= 1, "attention_scratch_floats: ",
           "B, rows, n_heads, head_dim and chunk must be positive");
    return size_t(B) * n_heads * max_chunks_of(rows, chunk) * (size_t(head_dim) + 2);
}

void launch_attention_decode(float* out, const float* q, const void* k, const void* v, DType kv_dtype,
                             const int32_t* lengths, int B, int rows, int n_heads, int n_kv_heads, int head_dim,
                             float scale, int chunk, float* scratch, void* stream) {
    check_attention(kv_dtype, nullptr, B, rows, n_heads, n_kv_heads, head_dim, scale, chunk);
    FM_ARG(B <= 65535 && n_heads <= 65535, "cuda attention: B and n_heads must be <= 65535 (grid)");
    if (chunk == 0) chunk = kMaxAttnChunk;
    const int max_chunks = max_chunks_of(rows, chunk), group = n_heads / n_kv_heads;
    float* part_o = scratch;
    float* part_ml = scratch + size_t(B) * n_heads * max_chunks * head_dim;
    const cudaStream_t s = detail::as_stream(stream);
    const dim3 grid{unsigned(max_chunks), unsigned(n_heads), unsigned(B)};
    if (kv_dtype == DType::F32)
        attention_chunks<float><<<grid, kThreads, 0, s>>>(part_o, part_ml, q, static_cast<const float*>(k),
                                                          static_cast<const float*>(v), lengths, rows, n_heads, group,
                                                          head_dim, scale, chunk, max_chunks);
    else
        attention_chunks<__half><<<grid, kThreads, 0, s>>>(part_o, part_ml, q, static_cast<const __half*>(k),
                                                           static_cast<const __half*>(v), lengths, rows, n_heads,
                                                           group, head_dim, scale, chunk, max_chunks);
    detail::check(cudaGetLastError(), "the attention launch");
    attention_combine<<<dim3{unsigned(n_heads), unsigned(B)}, kThreads, 0, s>>>(out, part_o, part_ml, lengths,
                                                                               n_heads, head_dim, chunk, max_chunks);
    detail::check(cudaGetLastError(), "the attention combine launch");
}

void attention_decode(float* out, const float* q, const void* k, const void* v, DType kv_dtype, const int32_t* lengths,
                      int B, int rows, int n_heads, int n_kv_heads, int head_dim, float scale, int chunk) {
    check_attention(kv_dtype, lengths, B, rows, n_heads, n_kv_heads, head_dim, scale, chunk);
    detail::require_device("cuda attention_decode");
    const size_t q_n = size_t(B) * n_heads * head_dim;
    const size_t kv_bytes = size_t(B) * rows * n_kv_heads * head_dim * dtype_size(kv_dtype);
    detail::DeviceBuffer<float> dq(q, q_n), dout(q_n);
    detail::DeviceBuffer<float> scratch(attention_scratch_floats(B, rows, n_heads, head_dim, chunk));
    detail::DeviceBuffer<uint8_t> dk(static_cast<const uint8_t*>(k), kv_bytes), dv(static_cast<const uint8_t*>(v), kv_bytes);
    detail::DeviceBuffer<int32_t> dlen(lengths, size_t(B));
    launch_attention_decode(dout.get(), dq.get(), dk.get(), dv.get(), kv_dtype, dlen.get(), B, rows, n_heads,
                            n_kv_heads, head_dim, scale, chunk, scratch.get(), nullptr);
    detail::finish("attention_decode");
    dout.download(out, q_n);
}

}  // namespace fm::cuda
