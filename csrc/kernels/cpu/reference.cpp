// Plain scalar references for the SIMD kernels in kernels_impl.inc.
#include "kernels/cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fm {

void gemm_ref(float* Y, size_t ldy, const float* X, size_t ldx, int T, const void* W, DType dt, size_t ldw,
              int K, int N) {
    for (int t = 0; t < T; ++t)
        for (int n = 0; n < N; ++n) {
            double s = 0;
            for (int k = 0; k < K; ++k) s += double(X[t * ldx + k]) * load_as_f32(W, dt, n * ldw + k);
            Y[t * ldy + n] = float(s);
        }
}

void ffn_decode_ref(float* y, const float* x, const void* const* rows, DType dt, int d_model, int n, Activation act) {
    std::vector<double> acc(y, y + d_model);
    for (int i = 0; i < n; ++i) {
        double g = 0, u = 0;
        for (int k = 0; k < d_model; ++k) {
            g += double(x[k]) * load_as_f32(rows[i], dt, k);
            u += double(x[k]) * load_as_f32(rows[i], dt, d_model + k);
        }
        const double a = activate_ref(act, g) * u;
        for (int d = 0; d < d_model; ++d) acc[d] += a * load_as_f32(rows[i], dt, 2 * d_model + d);
    }
    for (int d = 0; d < d_model; ++d) y[d] = float(acc[d]);
}

int32_t bit_sum_i8_ref(const uint8_t* bits, const int8_t* z, int n) {
    int32_t s = 0;
    for (int k = 0; k < n; ++k)
        if ((bits[k / 8] >> (k % 8)) & 1) s += z[k];
    return s;
}

float bit_sum_ref(const uint8_t* bits, const float* z, int n) {
    double s = 0;
    for (int k = 0; k < n; ++k)
        if ((bits[k / 8] >> (k % 8)) & 1) s += z[k];
    return float(s);
}

int32_t argmax_ref(const float* x, int n) { return int32_t(std::max_element(x, x + n) - x); }

void softmax_ref(float* x, int n, float scale) {
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; ++i) mx = std::fmax(mx, double(x[i]) * scale);
    std::vector<double> e(n);
    for (int i = 0; i < n; ++i) sum += (e[i] = std::exp(double(x[i]) * scale - mx));
    for (int i = 0; i < n; ++i) x[i] = float(e[i] / sum);
}

void accumulate_ref(float* Y, size_t ldy, const float* A, size_t lda, int T, const void* B, DType dt,
                    size_t ldb, int D, int NB) {
    for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d) {
            double s = Y[t * ldy + d];
            for (int j = 0; j < NB; ++j) s += double(A[t * lda + j]) * load_as_f32(B, dt, j * ldb + d);
            Y[t * ldy + d] = float(s);
        }
}

}  // namespace fm
