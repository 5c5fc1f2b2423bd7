#include "ffn/predictor.h"

#include "core/error.h"
#include "kernels/cpu/kernels.h"

namespace fm {

void Predictor::init(int n_layers, int n_neurons, int D, DType dt, int t_max, int n_threads) {
    layers_.clear();
    layers_.resize(n_layers);
    n_neurons_ = n_neurons, D_ = D, dt_ = dt, t_max_ = t_max, n_threads_ = n_threads, rank_ = 0;
}

bool Predictor::loaded() const {
    if (layers_.empty() || rank_ == 0) return false;
    for (const auto& L : layers_)
        if (!L.A.size() || !L.a.size() || !L.B.size() || !L.b.size()) return false;
    return true;
}

size_t Predictor::bytes() const {
    size_t n = hidden_.size() + convert_.size();
    for (const auto& L : layers_) n += L.A.size() + L.a.size() + L.B.size() + L.b.size();
    return n;
}

Buffer& Predictor::tensor(int layer, const std::string& kind, int rank) {
    FM_ARG(layer >= 0 && layer < int(layers_.size()), "predictor layer ", layer, " out of range");
    FM_ARG(rank > 0 && (rank_ == 0 || rank == rank_), "predictor rank ", rank, " differs from ", rank_);
    if (rank_ == 0) {
        rank_ = rank;
        hidden_.allocate(sizeof(float) * size_t(t_max_) * rank);
        convert_.allocate(sizeof(float) * n_threads_ * scratch_floats(D_ > rank ? D_ : rank));
    }
    PredictorLayer& L = layers_[layer];
    if (kind == "A") return L.A;
    if (kind == "a") return L.a;
    if (kind == "B") return L.B;
    FM_ARG(kind == "b", "unknown predictor tensor '", kind, "'");
    return L.b;
}

void Predictor::scores(ThreadPool& pool, int l, const float* xn, int T, float* out) {
    const Kernels& K = kernels();
    const PredictorLayer& L = layers_[l];
    const int di = int(dt_);
    const size_t esz = dtype_size(dt_), cs = convert_.size() / sizeof(float) / n_threads_;
    float* hid = hidden_.data<float>();
    // hidden (T, rank) = relu(xn A^T + a), then out (T, n) = hidden B^T + b
    pool.run([&](int tid, int nt) {
        auto [r0, r1] = ThreadPool::chunk(rank_, tid, nt, 8);
        if (r0 < r1)
            K.gemm[di](hid + r0, rank_, xn, D_, T, L.A.data<char>() + r0 * D_ * esz, D_, D_, int(r1 - r0),
                       convert_.data<float>() + tid * cs);
    });
    const float* a = L.a.data<float>();
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < rank_; ++r) {
            float v = hid[t * rank_ + r] + a[r];
            hid[t * rank_ + r] = v > 0 ? v : 0;
        }
    pool.run([&](int tid, int nt) {
        auto [n0, n1] = ThreadPool::chunk(n_neurons_, tid, nt, 16);
        if (n0 >= n1) return;
        K.gemm[di](out + n0, n_neurons_, hid, rank_, T, L.B.data<char>() + n0 * rank_ * esz, rank_, rank_,
                   int(n1 - n0), convert_.data<float>() + tid * cs);
        const float* b = L.b.data<float>();
        for (int t = 0; t < T; ++t)
            for (size_t i = n0; i < n1; ++i) out[size_t(t) * n_neurons_ + i] += b[i];
    });
}

}  // namespace fm
