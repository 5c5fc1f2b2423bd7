// Quantization to the block formats, bit-exact with ggml's reference quantizers
// (ggml-quants.c: quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1,q4_K,q5_K,q6_K}_ref, the K formats
// through make_qkx2_quants and make_qx_quants without an importance matrix). Each step is
// ggml's, in the same order and precision: float arithmetic, compiled with -ffp-contract=off
// (ggml's portable library has no fused multiply-adds either), ggml's nearest_int, C's
// truncating float-to-integer casts as x86 performs them, and f16 scales rounded to nearest
// even (GGML_FP32_TO_FP16).
#include "kernels/quant/quantize.h"

#include <cfloat>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "kernels/quant/blocks.h"

namespace fm::quant {

namespace {

// ggml's MIN and MAX macros (which operand wins on a NaN matters for bit-exactness).
template <typename T>
inline T gmin(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T gmax(T a, T b) { return a > b ? a : b; }

// ggml's nearest_int: adding 1.5 * 2^23 leaves v rounded to nearest (ties to even) in the low
// mantissa bits; exact for |v| < 2^22, and beyond that the same bits as ggml's.
inline int nearest_int(float v) {
    const float t = v + 12582912.f;
    int32_t i;
    std::memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

// C's truncating float -> int conversion as x86 computes it (cvttss2si): NaN and values out of
// int32's range give INT32_MIN. ggml casts floats straight to int8_t / uint8_t, which keeps the
// low byte of this.
inline int32_t trunc_i32(float v) { return v >= -2147483648.f && v < 2147483648.f ? int32_t(v) : INT32_MIN; }
inline int8_t trunc_i8(float v) { return int8_t(uint8_t(uint32_t(trunc_i32(v)))); }
inline uint8_t trunc_u8(float v) { return uint8_t(uint32_t(trunc_i32(v))); }

// ---- 32-weight formats (quantize_row_q*_{0,1}_ref)

void q8_0(const float* x, BlockQ8_0* y) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = gmax(amax, std::fabs(x[j]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    y->d = f32_to_f16(d);
    for (int j = 0; j < 32; ++j) y->qs[j] = trunc_i8(std::round(x[j] * id));
}

// The value of largest magnitude (the first of equals), with its sign: q4_0 and q5_0 map it to
// the most negative level.
inline float signed_absmax(const float* x) {
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < 32; ++j)
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    return max;
}

inline void min_max(const float* x, float* mn, float* mx) {
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < 32; ++j) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    *mn = lo;
    *mx = hi;
}

void q4_0(const float* x, BlockQ4_0* y) {
    const float d = signed_absmax(x) / -8.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    y->d = f32_to_f16(d);
    for (int j = 0; j < 16; ++j) {
        const uint8_t q0 = uint8_t(gmin(15, int(trunc_i8(x[j] * id + 8.5f))));
        const uint8_t q1 = uint8_t(gmin(15, int(trunc_i8(x[j + 16] * id + 8.5f))));
        y->qs[j] = uint8_t(q0 | (q1 << 4));
    }
}

void q4_1(const float* x, BlockQ4_1* y) {
    float mn, mx;
    min_max(x, &mn, &mx);
    const float d = (mx - mn) / 15.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    y->d = f32_to_f16(d);
    y->m = f32_to_f16(mn);
    for (int j = 0; j < 16; ++j) {
        const uint8_t q0 = uint8_t(gmin(15, int(trunc_i8((x[j] - mn) * id + 0.5f))));
        const uint8_t q1 = uint8_t(gmin(15, int(trunc_i8((x[j + 16] - mn) * id + 0.5f))));
        y->qs[j] = uint8_t(q0 | (q1 << 4));
    }
}

// The low nibbles of 32 five-bit levels into qs, the fifth bits into qh (bit i: weight i).
inline void pack5(const uint8_t* q, uint8_t* qs, uint8_t* qh) {
    uint32_t h = 0;
    for (int j = 0; j < 16; ++j) {
        qs[j] = uint8_t((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
        h |= ((q[j] & 0x10u) >> 4) << j;
        h |= ((q[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    std::memcpy(qh, &h, 4);
}

void q5_0(const float* x, BlockQ5_0* y) {
    const float d = signed_absmax(x) / -16.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    y->d = f32_to_f16(d);
    uint8_t q[32];
    for (int j = 0; j < 32; ++j) q[j] = uint8_t(gmin(31, int(trunc_i8(x[j] * id + 16.5f))));
    pack5(q, y->qs, y->qh);
}

void q5_1(const float* x, BlockQ5_1* y) {
    float mn, mx;
    min_max(x, &mn, &mx);
    const float d = (mx - mn) / 31.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    y->d = f32_to_f16(d);
    y->m = f32_to_f16(mn);
    uint8_t q[32];
    for (int j = 0; j < 32; ++j) q[j] = trunc_u8((x[j] - mn) * id + 0.5f);  // no clamp, as ggml
    pack5(q, y->qs, y->qh);
}

// ---- K formats

// ggml's make_qkx2_quants: levels L (0..nmax) of n weights x ~ scale * L - the_min, the scale
// and min fitted by weighted least squares over nstep + 1 trial scales (weighted squared error).
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = float(nmax) / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = uint8_t(gmax(0, gmin(nmax, l)));
        const float diff = scale * float(L[i]) + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * float(is) + float(nmax)) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = gmax(0, gmin(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = uint8_t(l);
            const float w = weights[i], fl = float(l);
            sum_l += w * fl;
            sum_l2 += w * fl * fl;
            sum_xl += w * fl * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * float(Laux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// ggml's make_qx_quants with rmse_type 1 and no importance weights (q6_k's sub-blocks): levels
// L (0..2 nmax - 1) of n weights x ~ scale * (L - nmax), the scale the best of 19 trials
// weighted by x^2.
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {  // GROUP_MAX_EPS: all zero
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = float(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = gmax(-nmax, gmin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = int8_t(l + nmax);
        const float w = x[i] * x[i], fl = float(l);
        sumlx += w * x[i] * fl;
        suml2 += w * fl * fl;
    }
    float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(float(nmax) + 0.1f * float(is)) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            const int l = gmax(-nmax, gmin(nmax - 1, nearest_int(iscale * x[i])));
            const float w = x[i] * x[i], fl = float(l);
            sumlx += w * x[i] * fl;
            suml2 += w * fl * fl;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) L[i] = int8_t(nmax + gmax(-nmax, gmin(nmax - 1, nearest_int(iscale * x[i]))));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// q4_k and q5_k (nmax 15 or 31): 8 sub-blocks of 32 fitted by make_qkx2_quants, their scales
// and mins quantized to 6 bits against the largest, then the levels L (256) recomputed from the
// quantized scales. Writes d, dmin and scales; returns the levels in L.
template <typename Block>
void qk_scales_and_levels(const float* x, Block* y, int nmax, float rmin, int nstep, uint8_t* L) {
    uint8_t Laux[32];
    float weights[32], mins[8], scales[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float* xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
        const float av_x = std::sqrt(sum_x2 / 32.f);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
        scales[j] = make_qkx2_quants(32, nmax, xs, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        const uint8_t ls = gmin<uint8_t>(63, uint8_t(nearest_int(inv_scale * scales[j])));
        const uint8_t lm = gmin<uint8_t>(63, uint8_t(nearest_int(inv_min * mins[j])));
        if (j < 4) {
            y->scales[j] = ls;
            y->scales[j + 4] = lm;
        } else {
            y->scales[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
            y->scales[j - 4] |= uint8_t((ls >> 4) << 6);
            y->scales[j] |= uint8_t((lm >> 4) << 6);
        }
    }
    y->d = f32_to_f16(max_scale / 63.f);
    y->dmin = f32_to_f16(max_min / 63.f);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        unpack_scale_min(y->scales, j, &sc, &m);
        const float d = f16_to_f32(y->d) * float(sc);
        if (d == 0.f) continue;  // keeps make_qkx2_quants' levels, as ggml does
        const float dm = f16_to_f32(y->dmin) * float(m);
        for (int i = 0; i < 32; ++i)
            L[32 * j + i] = uint8_t(gmax(0, gmin(nmax, nearest_int((x[32 * j + i] + dm) / d))));
    }
}

void q4_k(const float* x, BlockQ4_K* y) {
    uint8_t L[256];
    qk_scales_and_levels(x, y, 15, -1.f, 20, L);
    for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) y->qs[32 * j + l] = uint8_t(L[64 * j + l] | (L[64 * j + l + 32] << 4));
}

void q5_k(const float* x, BlockQ5_K* y) {
    uint8_t L[256];
    qk_scales_and_levels(x, y, 31, -0.5f, 15, L);
    std::memset(y->qh, 0, sizeof y->qh);
    for (int j = 0; j < 4; ++j) {
        const uint8_t m1 = uint8_t(1 << (2 * j)), m2 = uint8_t(2 << (2 * j));
        for (int l = 0; l < 32; ++l) {
            int l1 = L[64 * j + l], l2 = L[64 * j + l + 32];
            if (l1 > 15) {
                l1 -= 16;
                y->qh[l] |= m1;
            }
            if (l2 > 15) {
                l2 -= 16;
                y->qh[l] |= m2;
            }
            y->qs[32 * j + l] = uint8_t(l1 | (l2 << 4));
        }
    }
}

void q6_k(const float* x, BlockQ6_K* y) {
    int8_t L[256];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
        const float abs_scale = std::fabs(scales[ib]);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scales[ib];
        }
    }
    if (max_abs_scale < 1e-15f) {  // GROUP_MAX_EPS
        std::memset(y, 0, sizeof *y);
        y->d = f32_to_f16(0.f);
        return;
    }
    const float iscale = -128.f / max_scale;
    y->d = f32_to_f16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) y->scales[ib] = int8_t(gmin(127, nearest_int(iscale * scales[ib])));
    for (int j = 0; j < 16; ++j) {
        const float d = f16_to_f32(y->d) * float(y->scales[j]);
        if (d == 0.f) continue;  // keeps make_qx_quants' levels, as ggml does
        for (int i = 0; i < 16; ++i) L[16 * j + i] = int8_t(gmax(-32, gmin(31, nearest_int(x[16 * j + i] / d))) + 32);
    }
    for (int half = 0; half < 2; ++half) {
        const int8_t* Lh = L + 128 * half;
        uint8_t* ql = y->ql + 64 * half;
        uint8_t* qh = y->qh + 32 * half;
        for (int l = 0; l < 32; ++l) {
            ql[l] = uint8_t((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
            ql[l + 32] = uint8_t((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
            qh[l] = uint8_t((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                            ((Lh[l + 96] >> 4) << 6));
        }
    }
}

// Each block built in place of a zeroed local (out need not be aligned for the block's f16s).
template <typename Block, int kWeights>
void quantize_blocks(void (*q)(const float*, Block*), const float* x, uint8_t* out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        Block blk{};
        q(x + b * kWeights, &blk);
        std::memcpy(out + b * sizeof(Block), &blk, sizeof(Block));
    }
}

}  // namespace

void quantize(Format f, const float* x, void* out, int64_t n) {
    const FormatTraits& t = format_traits(f);
    FM_ARG(t.block > 1, "quantize: ", t.name, " is not a block format");
    FM_ARG(n >= 0 && n % t.block == 0, "quantize: ", n, " weights are not whole ", t.name, " blocks (", t.block,
           " weights each)");
    auto* dst = static_cast<uint8_t*>(out);
    const int64_t nb = n / t.block;
    switch (f) {
        case Format::Q8_0: return quantize_blocks<BlockQ8_0, 32>(q8_0, x, dst, nb);
        case Format::Q4_0: return quantize_blocks<BlockQ4_0, 32>(q4_0, x, dst, nb);
        case Format::Q4_1: return quantize_blocks<BlockQ4_1, 32>(q4_1, x, dst, nb);
        case Format::Q5_0: return quantize_blocks<BlockQ5_0, 32>(q5_0, x, dst, nb);
        case Format::Q5_1: return quantize_blocks<BlockQ5_1, 32>(q5_1, x, dst, nb);
        case Format::Q4_K: return quantize_blocks<BlockQ4_K, 256>(q4_k, x, dst, nb);
        case Format::Q5_K: return quantize_blocks<BlockQ5_K, 256>(q5_k, x, dst, nb);
        case Format::Q6_K: return quantize_blocks<BlockQ6_K, 256>(q6_k, x, dst, nb);
        default: FM_ARG(false, "quantize: ", t.name, " is not a block format");
    }
}

}  // namespace fm::quant
