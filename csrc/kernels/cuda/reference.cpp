// Scalar references of the CUDA kernels that have no CPU kernel of the same shape, and the
// decode GEMV's kernel code run on the CPU; compiled with or without CUDA (tests/test_cuda.py).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/checks.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/gemv_lanes.h"

namespace fm::cuda {

void attention_decode_ref(float* out, const float* q, const void* k, const void* v, DType kv_dtype,
                          const int32_t* lengths, int B, int rows, int n_heads, int n_kv_heads, int head_dim,
                          float scale) {
    check_attention(kv_dtype, lengths, B, rows, n_heads, n_kv_heads, head_dim, scale, 0);
    const int group = n_heads / n_kv_heads, hd = head_dim;
    const size_t kv_dim = size_t(n_kv_heads) * hd;
    std::vector<double> e, o(hd);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < n_heads; ++h) {
            const float* qh = q + (size_t(b) * n_heads + h) * hd;
            const int n = lengths[b];
            const size_t first = size_t(b) * rows * kv_dim + size_t(h / group) * hd;  // position 0, this KV head
            e.assign(n, 0.0);
            double mx = -INFINITY;
            for (int p = 0; p < n; ++p) {
                double s = 0;
                for (int d = 0; d < hd; ++d) s += double(qh[d]) * load_as_f32(k, kv_dtype, first + p * kv_dim + d);
                e[p] = s * scale;
                mx = std::fmax(mx, e[p]);
            }
            double sum = 0;
            for (int p = 0; p < n; ++p) sum += (e[p] = std::exp(e[p] - mx));
            std::fill(o.begin(), o.end(), 0.0);
            for (int p = 0; p < n; ++p)
                for (int d = 0; d < hd; ++d) o[d] += e[p] * load_as_f32(v, kv_dtype, first + p * kv_dim + d);
            float* oh = out + (size_t(b) * n_heads + h) * hd;
            for (int d = 0; d < hd; ++d) oh[d] = float(o[d] / sum);
        }
}

void gemv_emulated(Format f, float* y, const float* x, const void* W, int T, int N, int K) {
    check_gemv(f, T, N, K);
    const size_t row_bytes = format_row_bytes(f, K);
    const bool vectors = lanes::float_vectors(f, K);
    lanes::with_format(f, [&](auto tag) {
        constexpr Format F = decltype(tag)::value;
        constexpr int TM = kMaxGemvTokens;
        for (int n = 0; n < N; ++n) {
            float part[32][TM], next[32][TM];
            for (int lane = 0; lane < 32; ++lane) {
                lanes::Acc<TM> a(T, size_t(K));
                lanes::gemv_lane<F, TM>(static_cast<const uint8_t*>(W) + size_t(n) * row_bytes, x, K, lane, vectors, a);
                for (int t = 0; t < TM; ++t) part[lane][t] = a.v[t];
            }
            for (int o = 16; o > 0; o >>= 1) {  // the kernel's __shfl_xor_sync tree
                for (int lane = 0; lane < 32; ++lane)
                    for (int t = 0; t < TM; ++t) next[lane][t] = part[lane][t] + part[lane ^ o][t];
                std::copy(&next[0][0], &next[0][0] + 32 * TM, &part[0][0]);
            }
            for (int t = 0; t < T; ++t) y[size_t(t) * N + n] = part[t][t];  // lane t writes token t
        }
    });
}

}  // namespace fm::cuda
