#include "memory/ivf_index.h"

#include <cmath>
#include <numeric>
#include <random>

#include "core/thread_pool.h"

namespace fm::memory {

IvfIndex::IvfIndex(const KeyStore& store, const Params& p) : store_(store) {
    nlist_param_ = int(param_or(p, "nlist", 0));
    nprobe_ = int(param_or(p, "nprobe", 0));
    train_size_ = int(param_or(p, "train_size", 4096));
    iters_ = int(param_or(p, "kmeans_iters", 12));
    retrain_growth_ = param_or(p, "retrain_growth", 8.0);
    seed_ = uint64_t(param_or(p, "seed", 1234));
    FM_ARG(nlist_param_ >= 0 && nprobe_ >= 0 && train_size_ >= 1 && iters_ >= 1 && retrain_growth_ > 1,
           "ivf: nlist, nprobe >= 0; train_size, kmeans_iters >= 1; retrain_growth > 1");
}

void IvfIndex::set_param(const std::string& key, double value) {
    if (key == "nprobe") {
        FM_ARG(value >= 0, "ivf: nprobe must be >= 0 (0 = automatic)");
        nprobe_ = int(value);
    } else if (key == "train") {
        train();
    } else {
        FM_ARG(false, "ivf: parameter '", key, "' cannot be set after creation (settable: nprobe; 'train' retrains)");
    }
}

std::vector<Params> IvfIndex::ladder() const {
    std::vector<Params> out;
    if (nlist_ == 0) return out;  // untrained: answers exactly
    for (double np = 1; np < nlist_; np = std::max(np + 1, std::round(np * 1.5))) out.push_back({{"nprobe", np}});
    out.push_back({{"nprobe", double(nlist_)}});
    return out;
}

double IvfIndex::get_param(const std::string& key) const {
    if (key == "nprobe") return effective_nprobe();
    if (key == "nlist") return nlist_;
    if (key == "trained") return nlist_ > 0;
    if (key == "train_size") return train_size_;
    FM_ARG(false, "ivf: unknown parameter '", key, "' (nlist, nprobe, trained, train_size)");
}

int IvfIndex::effective_nprobe() const {
    if (nprobe_ > 0) return std::min(nprobe_, std::max(nlist_, 1));
    return std::min(nlist_, std::max(16, int(std::ceil(3 * std::sqrt(double(nlist_))))));
}

size_t IvfIndex::memory_bytes() const {
    size_t n = centroids_.size() * sizeof(float) + (list_of_.size() + pos_of_.size()) * sizeof(uint32_t);
    for (const auto& l : lists_) n += l.capacity() * sizeof(uint32_t) + sizeof(l);
    for (const auto& k : list_keys_) n += k.capacity() * sizeof(float) + sizeof(k);
    return n;
}

uint32_t IvfIndex::nearest(const float* x) const {
    uint32_t best = 0;
    float bs = -3.0e38f;
    for (int c = 0; c < nlist_; ++c) {
        const float s = store_.score(x, centroids_.data() + size_t(c) * store_.dim());
        if (s > bs) bs = s, best = uint32_t(c);
    }
    return best;
}

void IvfIndex::assign(uint32_t slot) {
    if (list_of_.size() <= slot) list_of_.resize(slot + 1, kNone), pos_of_.resize(slot + 1, 0);
    const uint32_t c = nearest(store_.row(slot));
    list_of_[slot] = c;
    pos_of_[slot] = uint32_t(lists_[c].size());
    lists_[c].push_back(slot);
    list_keys_[c].insert(list_keys_[c].end(), store_.row(slot), store_.row(slot) + store_.dim());
}

void IvfIndex::add(uint32_t slot) {
    if (nlist_ == 0) {
        if (store_.size() >= size_t(train_size_)) train();
    } else if (store_.size() >= size_t(retrain_growth_ * double(trained_at_))) {
        train();
    } else {
        assign(slot);
    }
}

void IvfIndex::remove(uint32_t slot) {
    if (nlist_ == 0 || slot >= list_of_.size() || list_of_[slot] == kNone) return;
    auto& l = lists_[list_of_[slot]];
    auto& keys = list_keys_[list_of_[slot]];
    const size_t d = store_.dim();
    const uint32_t p = pos_of_[slot], last = l.back();
    l[p] = last;
    pos_of_[last] = p;
    l.pop_back();
    std::copy(keys.end() - d, keys.end(), keys.begin() + p * d);
    keys.resize(keys.size() - d);
    list_of_[slot] = kNone;
}

void IvfIndex::train() {
    const int d = store_.dim();
    std::vector<uint32_t> live;
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s)) live.push_back(s);
    const size_t n = live.size();
    if (n == 0) return;
    int k = nlist_param_ > 0 ? nlist_param_ : int(std::lround(4 * std::sqrt(double(n))));
    k = std::max(1, std::min<int>(k, int(n)));
    std::mt19937_64 rng(seed_);
    std::shuffle(live.begin(), live.end(), rng);
    const size_t m = std::min(n, size_t(k) * 64);  // the training sample
    std::vector<float> x(m * d), c(size_t(k) * d), scores(m * k);
    for (size_t i = 0; i < m; ++i) std::memcpy(&x[i * d], store_.row(live[i]), sizeof(float) * d);
    for (int j = 0; j < k; ++j) std::memcpy(&c[size_t(j) * d], &x[size_t(j) * d], sizeof(float) * d);
    const bool l2 = store_.metric() == Metric::L2;
    std::vector<uint32_t> assign(m);
    ThreadPool pool(int(std::max(1u, std::thread::hardware_concurrency())));
    const Kernels& K = kernels();
    for (int it = 0; it < iters_; ++it) {
        // scores = x c^T (for l2, argmax of x.c - |c|^2/2 is the nearest centroid)
        std::vector<float> half_norm(k, 0.f);
        if (l2)
            for (int j = 0; j < k; ++j) half_norm[j] = 0.5f * K.dot(&c[size_t(j) * d], &c[size_t(j) * d], d);
        pool.parallel_for(m, 4, [&](size_t b, size_t e, int tid) {
            std::vector<float> scratch(scratch_floats(d));
            K.gemm[0](&scores[b * k], k, &x[b * d], d, int(e - b), c.data(), d, d, k, scratch.data());
            for (size_t i = b; i < e; ++i) {
                uint32_t best = 0;
                float bs = -3.0e38f;
                for (int j = 0; j < k; ++j) {
                    const float s = scores[i * k + j] - half_norm[j];
                    if (s > bs) bs = s, best = uint32_t(j);
                }
                assign[i] = best;
            }
        });
        std::vector<double> sum(size_t(k) * d, 0.0);
        std::vector<size_t> cnt(k, 0);
        for (size_t i = 0; i < m; ++i) {
            ++cnt[assign[i]];
            for (int t = 0; t < d; ++t) sum[size_t(assign[i]) * d + t] += x[i * d + t];
        }
        std::uniform_int_distribution<size_t> pick(0, m - 1);
        for (int j = 0; j < k; ++j) {
            float* cj = &c[size_t(j) * d];
            if (cnt[j] == 0) {  // an empty cluster restarts at a random sample point
                std::memcpy(cj, &x[pick(rng) * d], sizeof(float) * d);
                continue;
            }
            double nrm = 0;
            for (int t = 0; t < d; ++t) cj[t] = float(sum[size_t(j) * d + t] / double(cnt[j])), nrm += double(cj[t]) * cj[t];
            if (!l2 && nrm > 0)  // spherical k-means for cosine and inner product
                for (int t = 0; t < d; ++t) cj[t] = float(cj[t] / std::sqrt(nrm));
        }
    }
    centroids_ = std::move(c);
    nlist_ = k;
    lists_.assign(k, {});
    list_keys_.assign(k, {});
    list_of_.assign(store_.high_water(), kNone);
    pos_of_.assign(store_.high_water(), 0);
    for (uint32_t s : live) IvfIndex::assign(s);
    trained_at_ = n;
}

void IvfIndex::search(const float* q, const AllowMask* allow, TopK& out) const {
    if (nlist_ == 0) return exact_search(store_, q, allow, out);
    const int d = store_.dim();
    const bool l2 = store_.metric() == Metric::L2;
    thread_local std::vector<float> scores;
    thread_local std::vector<std::pair<float, uint32_t>> cs;
    cs.resize(nlist_);
    scores.resize(nlist_);
    if (!l2) kernels().gemm[0](scores.data(), nlist_, q, d, 1, centroids_.data(), d, d, nlist_, nullptr);
    for (int c = 0; c < nlist_; ++c)
        cs[c] = {l2 ? store_.score(q, centroids_.data() + size_t(c) * d) : scores[c], uint32_t(c)};
    const int np = effective_nprobe();
    std::partial_sort(cs.begin(), cs.begin() + np, cs.end(), std::greater<>());
    for (int i = 0; i < np; ++i) {
        const auto& l = lists_[cs[i].second];
        const float* keys = list_keys_[cs[i].second].data();
        if (!l2) {  // a whole list at once through the GEMV kernel
            scores.resize(l.size());
            kernels().gemm[0](scores.data(), l.size(), q, d, 1, keys, d, d, int(l.size()), nullptr);
        }
        for (size_t j = 0; j < l.size(); ++j) {
            const float sc = l2 ? store_.score(q, keys + j * d) : scores[j];
            if (sc > out.worst() && (!allow || (*allow)[l[j]])) out.push(sc, l[j]);
        }
    }
}

void IvfIndex::save(Writer& w) const {
    w.put<int32_t>(nlist_param_);
    w.put<int32_t>(nprobe_);
    w.put<int32_t>(train_size_);
    w.put<int32_t>(iters_);
    w.put<double>(retrain_growth_);
    w.put<uint64_t>(seed_);
    w.put<int32_t>(nlist_);
    w.put<uint64_t>(trained_at_);
    w.vec(centroids_);
    for (const auto& l : lists_) w.vec(l);
}

void IvfIndex::load(Reader& r) {
    nlist_param_ = r.get<int32_t>("ivf nlist param");
    nprobe_ = r.get<int32_t>("ivf nprobe");
    train_size_ = r.get<int32_t>("ivf train_size");
    iters_ = r.get<int32_t>("ivf iters");
    retrain_growth_ = r.get<double>("ivf retrain_growth");
    seed_ = r.get<uint64_t>("ivf seed");
    nlist_ = r.get<int32_t>("ivf nlist");
    trained_at_ = r.get<uint64_t>("ivf trained_at");
    if (nlist_param_ < 0 || nprobe_ < 0 || train_size_ < 1 || iters_ < 1 || !(retrain_growth_ > 1) || nlist_ < 0)
        r.fail("bad ivf parameters");
    centroids_ = r.vec<float>("ivf centroids");
    if (centroids_.size() != size_t(nlist_) * store_.dim()) r.fail("ivf centroids do not match nlist");
    const uint32_t hw = store_.high_water();
    lists_.assign(nlist_, {});
    list_keys_.assign(nlist_, {});
    list_of_.assign(hw, kNone);
    pos_of_.assign(hw, 0);
    size_t listed = 0;
    for (int c = 0; c < nlist_; ++c) {
        lists_[c] = r.vec<uint32_t>("ivf list");
        for (size_t j = 0; j < lists_[c].size(); ++j) {
            const uint32_t s = lists_[c][j];
            if (s >= hw || !store_.live(s) || list_of_[s] != kNone) r.fail("ivf list holds a bad slot");
            list_of_[s] = uint32_t(c), pos_of_[s] = uint32_t(j);
            list_keys_[c].insert(list_keys_[c].end(), store_.row(s), store_.row(s) + store_.dim());
        }
        listed += lists_[c].size();
    }
    if (nlist_ > 0 && listed != store_.size()) r.fail("ivf lists do not cover the entries");
}

}  // namespace fm::memory
