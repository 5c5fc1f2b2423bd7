// Scalar references of the block-format kernels (quant.h), for the tests.
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "kernels/quant/quant.h"

namespace fm::quant {

template <typename Q>
void quantize_act_ref(const float* x, ActBlockOf<Q>* out, int K) {
    constexpr float qmax = sizeof(Q) == 1 ? 127.0f : 32767.0f;
    FM_ARG(K % kActBlock == 0, "quantize_act: ", K, " is not a multiple of ", kActBlock);
    for (int b = 0; b < K / kActBlock; ++b) {
        const float* xb = x + b * kActBlock;
        float amax = 0;
        for (int i = 0; i < kActBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
        const float d = amax / qmax, id = d != 0 ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < kActBlock; ++i) {
            out[b].qs[i] = Q(std::nearbyint(xb[i] * id));
            sum += out[b].qs[i];
        }
        out[b].d = d;
        out[b].s = d * float(sum);
    }
}

template <typename Q>
void matmul_ref(Format f, float* Y, size_t ldy, const ActBlockOf<Q>* A, int T, const void* W, size_t row_bytes, int K,
                int N) {
    std::vector<float> w(K);
    const int nb = K / kActBlock;
    for (int n = 0; n < N; ++n) {
        dequantize(f, static_cast<const uint8_t*>(W) + n * row_bytes, w.data(), K);
        for (int t = 0; t < T; ++t) {
            double s = 0;
            for (int b = 0; b < nb; ++b)
                for (int i = 0; i < kActBlock; ++i)
                    s += double(w[b * kActBlock + i]) * (double(A[t * nb + b].d) * A[t * nb + b].qs[i]);
            Y[t * ldy + n] = float(s);
        }
    }
}

void dot_ptrs_ref(Format f, float* out, const ActBlock* a, const void* const* rows, size_t offset, int K, int n) {
    for (int i = 0; i < n; ++i)
        matmul_ref(f, out + i, 1, a, 1, static_cast<const uint8_t*>(rows[i]) + offset, 0, K, 1);
}

void axpy_ptrs_ref(Format f, float* y, const float* c, const void* const* rows, size_t offset, int K, int n) {
    std::vector<float> w(K);
    std::vector<double> sum(y, y + K);
    for (int i = 0; i < n; ++i) {
        dequantize(f, static_cast<const uint8_t*>(rows[i]) + offset, w.data(), K);
        for (int k = 0; k < K; ++k) sum[k] += double(c[i]) * w[k];
    }
    for (int k = 0; k < K; ++k) y[k] = float(sum[k]);
}

void axpy_split_ref(Format f, float* y, const float* c, const void* const* rows, size_t offset,
                    const uint16_t* const* scales, int K, int n) {
    FM_ARG(f == Format::Q4_0 || f == Format::Q4_1 || f == Format::Q8_0, "axpy_split: format ", format_name(f),
           " has no split columns");
    FM_ARG(K % 32 == 0, "axpy_split: ", K, " is not a multiple of 32");
    std::vector<double> sum(y, y + K);
    for (int i = 0; i < n; ++i) {
        const uint8_t* q = static_cast<const uint8_t*>(rows[i]) + offset;
        for (int k = 0; k < K; ++k) {
            const int chunk = k / 32, e = k % 32;
            const float d = f16_to_f32(scales[i][k]);
            float w;
            if (f == Format::Q8_0) {
                w = d * float(int8_t(q[k]));
            } else {
                const uint8_t b = q[chunk * 16 + e % 16];
                const int v = e < 16 ? b & 15 : b >> 4;
                w = f == Format::Q4_0 ? d * float(v - 8) : d * float(v) + f16_to_f32(scales[i][K + k]);
            }
            sum[k] += double(c[i]) * w;
        }
    }
    for (int k = 0; k < K; ++k) y[k] = float(sum[k]);
}

template void quantize_act_ref(const float*, ActBlock*, int);
template void quantize_act_ref(const float*, ActBlock16*, int);
template void matmul_ref(Format, float*, size_t, const ActBlock*, int, const void*, size_t, int, int);
template void matmul_ref(Format, float*, size_t, const ActBlock16*, int, const void*, size_t, int, int);

}  // namespace fm::quant
