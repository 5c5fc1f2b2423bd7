#include "ffn/predictor.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/cpu/kernels.h"
#include "kernels/quant/quant.h"

namespace fm {

void Predictor::init(int n_layers, int d_ff, int d_model, int t_max, Activation act, int rank) {
    FM_ARG(rank >= 0 && rank % quant::kActBlock == 0, "predictor rank must be 0 (sign predictor) or a multiple of ",
           quant::kActBlock, ", got ", rank);
    FM_ARG(rank == 0 || d_model % quant::kActBlock == 0, "a low-rank predictor needs d_model a multiple of ",
           quant::kActBlock, ", got ", d_model);
    act_ = act;
    layers_.clear();
    layers_.resize(n_layers);
    d_ff_ = d_ff, d_model_ = d_model, t_max_ = t_max, rank_ = rank;
}

size_t Predictor::lowrank_in_row_bytes() const { return size_t(d_model_ / 32) * sizeof(quant::BlockQ8_0); }
size_t Predictor::lowrank_out_row_bytes() const { return size_t(rank_ / 32) * sizeof(quant::BlockQ8_0); }

bool Predictor::loaded() const {
    if (layers_.empty()) return false;
    for (const auto& L : layers_)
        if (rank_ ? !L.lowrank_in.size() || !L.lowrank_out.size()
                  : !L.gate_sign.size() || !L.up_sign.size() || !L.gate_row.size() || !L.up_row.size() ||
                        !L.gate_col.size() || !L.up_col.size() || !L.outlier_dims.size() ||
                        !L.outlier_weight.size() || !L.outlier_scale.size())
            return false;
    return true;
}

size_t Predictor::bytes() const {
    size_t n = z_.size() + zq_.size() + act_x_.size() + act_h_.size() + h_.size() + up_.size();
    for (const auto& L : layers_)
        n += L.gate_sign.size() + L.up_sign.size() + L.gate_row.size() + L.up_row.size() + L.gate_col.size() +
             L.up_col.size() + L.outlier_dims.size() + L.outlier_weight.size() + L.outlier_scale.size() +
             L.lowrank_in.size() + L.lowrank_out.size();
    return n;
}

size_t Predictor::bytes_for(int n_layers, int d_ff, int d_model, int t_max, int rank) {
    auto buf = [](size_t n) { return (n + 63) / 64 * 64; };
    if (rank) {
        const size_t block = sizeof(quant::BlockQ8_0), act = sizeof(quant::ActBlock);
        return size_t(n_layers) * (buf(2 * size_t(rank) * (d_model / 32) * block) +
                                   buf(2 * size_t(d_ff) * (rank / 32) * block)) +
               buf(size_t(t_max) * (d_model / 32) * act) + buf(size_t(t_max) * (2 * rank / 32) * act) +
               buf(4 * size_t(t_max) * 2 * rank) + buf(4 * size_t(t_max) * d_ff);
    }
    const size_t M = d_model < kOutlierDims ? d_model : kOutlierDims;
    return size_t(n_layers) * (2 * buf(size_t(d_ff) * ((d_model + 7) / 8)) + 2 * buf(4 * size_t(d_ff)) +
                               2 * buf(4 * size_t(d_model)) + buf(4 * M) + buf(size_t(d_ff) * 2 * M) + buf(8 * M)) +
           buf(sizeof(float) * size_t(t_max) * 2 * (d_model + M)) + buf(size_t(t_max) * 2 * d_model);
}

float quantize_predictor_z(const float* z, int n, int8_t* q) {
    float mx = 0;
    for (int k = 0; k < n; ++k) mx = std::max(mx, std::fabs(z[k]));
    if (!(mx > 0)) {
        std::fill(q, q + n, int8_t(0));
        return 0.0f;
    }
    const float inv = 127.0f / mx;
    for (int k = 0; k < n; ++k) {  // clamped, and a NaN (a non-finite z) taken as 0: no undefined cast
        const float v = std::nearbyint(z[k] * inv);
        q[k] = v == v ? int8_t(std::clamp(v, -127.0f, 127.0f)) : int8_t(0);
    }
    return mx / 127.0f;
}

Buffer& Predictor::tensor(int layer, const std::string& kind, std::vector<int64_t>& shape, const char*& dtype) {
    FM_ARG(layer >= 0 && layer < int(layers_.size()), "predictor layer ", layer, " out of range");
    PredictorLayer& L = layers_[layer];
    const bool lowrank_kind = kind == "lowrank_in" || kind == "lowrank_out";
    FM_ARG(lowrank_kind == (rank_ > 0), "predictor tensor '", kind, "' does not belong to the ",
           rank_ ? "low-rank" : "sign", " predictor the sparse FFN was configured for");
    if (lowrank_kind) {
        if (!act_x_.size()) {
            act_x_.allocate(size_t(t_max_) * (d_model_ / 32) * sizeof(quant::ActBlock));
            act_h_.allocate(size_t(t_max_) * (2 * rank_ / 32) * sizeof(quant::ActBlock));
            h_.allocate(4 * size_t(t_max_) * 2 * rank_);
            up_.allocate(4 * size_t(t_max_) * d_ff_);
        }
        dtype = "u8";
        if (kind == "lowrank_in") {
            shape = {2 * int64_t(rank_), int64_t(lowrank_in_row_bytes())};
            return L.lowrank_in;
        }
        shape = {2 * int64_t(d_ff_), int64_t(lowrank_out_row_bytes())};
        return L.lowrank_out;
    }
    const int M = outlier_dims();
    if (!z_.size()) z_.allocate(sizeof(float) * size_t(t_max_) * 2 * (d_model_ + M));
    if (!zq_.size()) zq_.allocate(size_t(t_max_) * 2 * d_model_);
    dtype = "f32";
    if (kind == "outlier_dims") {
        dtype = "i32";
        shape = {M};
        return L.outlier_dims;
    }
    if (kind == "outlier_weight") {
        dtype = "i8";
        shape = {d_ff_, 2 * M};
        return L.outlier_weight;
    }
    if (kind == "outlier_scale") {
        shape = {2 * M};
        return L.outlier_scale;
    }
    if (kind == "gate_sign" || kind == "up_sign") {
        dtype = "u8";
        shape = {d_ff_, sign_row_bytes()};
        return kind == "gate_sign" ? L.gate_sign : L.up_sign;
    }
    if (kind == "gate_row" || kind == "up_row") {
        shape = {d_ff_};
        return kind == "gate_row" ? L.gate_row : L.up_row;
    }
    FM_ARG(kind == "gate_col" || kind == "up_col", "unknown predictor tensor '", kind, "'");
    shape = {d_model_};
    return kind == "gate_col" ? L.gate_col : L.up_col;
}

void Predictor::check_outlier_dims(int l, const std::string& path) const {
    const int32_t* dims = layers_[l].outlier_dims.data<int32_t>();
    for (int j = 0; j < outlier_dims(); ++j)
        FM_ARG(dims[j] >= 0 && dims[j] < d_model_, "'", path, "': predictor of layer ", l, ": outlier dim ", dims[j],
               " out of range [0, ", d_model_, ")");
}

void Predictor::check_lowrank(int l, const std::string& kind, const std::string& path) const {
    const PredictorLayer& L = layers_[l];
    const bool in = kind == "lowrank_in";
    const Buffer& b = in ? L.lowrank_in : L.lowrank_out;
    const size_t n = b.size() / sizeof(quant::BlockQ8_0), per_row = (in ? d_model_ : rank_) / 32;
    const auto* blocks = b.data<quant::BlockQ8_0>();
    for (size_t i = 0; i < n; ++i)
        FM_ARG(std::isfinite(f16_to_f32(blocks[i].d)), "'", path, "': predictor tensor ", kind, " of layer ", l,
               ": row ", i / per_row, " has a non-finite q8_0 scale");
}

void Predictor::lowrank_scores(ThreadPool& pool, int l, const float* xn, int T, float* out) {
    const quant::QuantKernels& Q = quant::quant_kernels();
    const auto matmul = Q.matmul[int(Format::Q8_0)];
    const PredictorLayer& L = layers_[l];
    const int d = d_model_, r = rank_, xb = d / 32, hb = r / 32;
    FM_ARG(T <= t_max_, "predictor: at most ", t_max_, " tokens per call, got ", T);
    auto* ax = act_x_.data<quant::ActBlock>();
    auto* ag = act_h_.data<quant::ActBlock>();  // (T, r/32) for gate's h, then (T, r/32) for up's
    auto* au = ag + size_t(T) * hb;
    float* h = h_.data<float>();
    float* up = up_.data<float>();
    const uint8_t* in = L.lowrank_in.data<uint8_t>();
    const uint8_t* outw = L.lowrank_out.data<uint8_t>();
    const size_t in_rb = lowrank_in_row_bytes(), out_rb = lowrank_out_row_bytes();
    for (int t = 0; t < T; ++t) Q.quantize_act(xn + size_t(t) * d, ax + size_t(t) * xb, d);
    pool.run([&](int tid, int nt) {  // h (T, 2r) = in . x
        auto [a, b] = ThreadPool::chunk(2 * size_t(r), tid, nt, 8);
        if (a < b) matmul(h + a, 2 * r, ax, T, in + a * in_rb, in_rb, d, int(b - a));
    });
    for (int t = 0; t < T; ++t) {
        Q.quantize_act(h + size_t(t) * 2 * r, ag + size_t(t) * hb, r);
        Q.quantize_act(h + size_t(t) * 2 * r + r, au + size_t(t) * hb, r);
    }
    pool.run([&](int tid, int nt) {  // gate (into out) and up estimates, then the scores
        auto [a, b] = ThreadPool::chunk(d_ff_, tid, nt, 16);
        if (a >= b) return;
        matmul(out + a, d_ff_, ag, T, outw + a * out_rb, out_rb, r, int(b - a));
        matmul(up + a, d_ff_, au, T, outw + (d_ff_ + a) * out_rb, out_rb, r, int(b - a));
        for (int t = 0; t < T; ++t)
            for (size_t i = a; i < b; ++i) {
                float& o = out[size_t(t) * d_ff_ + i];
                o = std::fabs(activate(act_, o) * up[size_t(t) * d_ff_ + i]);
            }
    });
}

void Predictor::scores(ThreadPool& pool, int l, const float* xn, int T, float* out) {
    if (rank_) return lowrank_scores(pool, l, xn, T, out);
    const Kernels& K = kernels();
    const PredictorLayer& L = layers_[l];
    const int d_model = d_model_, M = outlier_dims(), rb = sign_row_bytes(), stride = 2 * (d_model + M);
    const int32_t* dims = L.outlier_dims.data<int32_t>();
    const float* scale = L.outlier_scale.data<float>();
    // per token: gate col*x (d_model), up col*x (d_model), scale*x on the outlier dims (2M)
    float* z = z_.data<float>();
    int8_t* zq = zq_.data<int8_t>();
    float zscale[2 * 256];   // per token and matrix: z's 8-bit scale
    int32_t sums[2 * 256];   // and the sum of its 8-bit values (T <= t_max <= 256)
    FM_ARG(T <= 256, "predictor: at most 256 tokens per call");
    for (int t = 0; t < T; ++t) {
        const float* x = xn + size_t(t) * d_model;
        float* zg = z + size_t(t) * stride;
        float* zu = zg + d_model;
        float* zo = zu + d_model;
        for (int k = 0; k < d_model; ++k) {
            zg[k] = L.gate_col.data<float>()[k] * x[k];
            zu[k] = L.up_col.data<float>()[k] * x[k];
        }
        for (int j = 0; j < 2 * M; ++j) zo[j] = scale[j] * x[dims[j % M]];
        for (int m = 0; m < 2; ++m) {
            int8_t* q = zq + (size_t(t) * 2 + m) * d_model;
            zscale[2 * t + m] = quantize_predictor_z(m ? zu : zg, d_model, q);
            int32_t s = 0;
            for (int k = 0; k < d_model; ++k) s += q[k];
            sums[2 * t + m] = s;
        }
    }
    pool.run([&](int tid, int nt) {
        auto [n0, n1] = ThreadPool::chunk(d_ff_, tid, nt, 16);
        for (size_t i = n0; i < n1; ++i) {
            const uint8_t* gs = L.gate_sign.data<uint8_t>() + i * rb;
            const uint8_t* us = L.up_sign.data<uint8_t>() + i * rb;
            const int8_t* q = L.outlier_weight.data<int8_t>() + i * 2 * M;
            const float gr = L.gate_row.data<float>()[i], ur = L.up_row.data<float>()[i];
            for (int t = 0; t < T; ++t) {
                const float* zo = z + size_t(t) * stride + 2 * d_model;
                const int8_t* qg = zq + size_t(t) * 2 * d_model;
                float g = gr * zscale[2 * t] * float(2 * K.bit_sum_i8(gs, qg, d_model) - sums[2 * t]);
                float u = ur * zscale[2 * t + 1] * float(2 * K.bit_sum_i8(us, qg + d_model, d_model) - sums[2 * t + 1]);
                for (int j = 0; j < M; ++j) g += float(q[j]) * zo[j], u += float(q[M + j]) * zo[M + j];
                out[size_t(t) * d_ff_ + i] = std::fabs(activate(act_, g) * u);
            }
        }
    });
}

void predictor_scores_ref(const PredictorRef& p, const float* x, int d_model, int d_ff, float* out) {
    const int rb = (d_model + 7) / 8, M = p.M;
    std::vector<float> zg(d_model), zu(d_model);
    std::vector<int8_t> qg(d_model), qu(d_model);
    for (int k = 0; k < d_model; ++k) zg[k] = p.gate_col[k] * x[k], zu[k] = p.up_col[k] * x[k];
    const double sg = quantize_predictor_z(zg.data(), d_model, qg.data());
    const double su = quantize_predictor_z(zu.data(), d_model, qu.data());
    for (int i = 0; i < d_ff; ++i) {
        double g = 0, u = 0;
        for (int k = 0; k < d_model; ++k) {
            const bool gp = (p.gate_sign[size_t(i) * rb + k / 8] >> (k % 8)) & 1;
            const bool up = (p.up_sign[size_t(i) * rb + k / 8] >> (k % 8)) & 1;
            g += (gp ? 1.0 : -1.0) * qg[k] * sg;
            u += (up ? 1.0 : -1.0) * qu[k] * su;
        }
        g *= p.gate_row[i], u *= p.up_row[i];
        for (int j = 0; j < M; ++j) {
            const double xo = x[p.outlier_dims[j]];
            g += double(p.outlier_weight[size_t(i) * 2 * M + j]) * p.outlier_scale[j] * xo;
            u += double(p.outlier_weight[size_t(i) * 2 * M + M + j]) * p.outlier_scale[M + j] * xo;
        }
        out[i] = float(std::fabs(activate_ref(p.act, g) * u));
    }
}

}  // namespace fm
