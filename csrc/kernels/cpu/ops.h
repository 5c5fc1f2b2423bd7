// Small per-token ops (O(d) work each): plain C++, written to match HF transformers' Llama.
#pragma once
#include <cmath>
#include <cstddef>

namespace fm {

// out = x / sqrt(mean(x^2) + eps) * w   (x, out, w: (d))
inline void rmsnorm(float* out, const float* x, const float* w, int d, float eps) {
    double part[8] = {};  // 8 sums in flight (one would wait on each add's latency): vectorized
    int i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; ++j) part[j] += double(x[i + j]) * x[i + j];
    for (int j = 0; i < d; ++i, ++j) part[j] += double(x[i]) * x[i];
    double ss = 0;
    for (double p : part) ss += p;
    float inv = 1.0f / std::sqrt(float(ss / d) + eps);
    for (int i = 0; i < d; ++i) out[i] = w[i] * (x[i] * inv);
}

// Rotary embedding, HF "rotate_half" convention: pairs (i, i + hd/2) of each head.
// v: (n_heads, hd); cs, sn: (hd/2) cos and sin for this position.
inline void rope(float* v, int n_heads, int hd, const float* cs, const float* sn) {
    const int half = hd / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* p = v + h * hd;
        for (int i = 0; i < half; ++i) {
            float x1 = p[i], x2 = p[i + half];
            p[i] = x1 * cs[i] - x2 * sn[i];
            p[i + half] = x2 * cs[i] + x1 * sn[i];
        }
    }
}


}  // namespace fm
