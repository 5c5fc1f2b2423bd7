#include "memory/tuning.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

namespace fm::memory {

double default_target(const std::string& index_name) {
    if (index_name == "hnsw" || index_name == "ivf") return 0.95;
    if (index_name == "lsh") return 0.9;
    return 0;
}

bool is_tuned_param(const std::string& key) {
    return key == "ef_search" || key == "nprobe" || key == "probes" || key == "rerank" || key == "rerank_per_k";
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Two kinds of queries, nq / 2 each, made from sampled stored keys x:
//  - like new data: x moved by beta * (a - b), the difference of two other sampled keys, beta from
//    0.3 to 0.8. The step follows the data's own spread, so the query lands between stored keys
//    as a new key does (graph and list indexes find these the hardest);
//  - noisy copies: x plus Gaussian noise of 0.25 to 1.0 times its norm (hash indexes find these
//    the hardest: noise flips hyperplane signs in every direction).
std::vector<float> sample_queries(const KeyStore& store, int nq, uint64_t seed) {
    const int d = store.dim(), half = nq / 2;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> gauss(0.f, 1.f);
    std::vector<uint32_t> live;
    live.reserve(store.size());
    for (uint32_t s = 0; s < store.high_water(); ++s)
        if (store.live(s)) live.push_back(s);
    std::uniform_int_distribution<size_t> pick(0, live.size() - 1);
    std::vector<float> q(size_t(nq) * d), moved(d);
    for (int i = 0; i < nq; ++i) {
        const float *x = store.row(live[pick(rng)]), *a = store.row(live[pick(rng)]), *b = store.row(live[pick(rng)]);
        const bool like_new = i < half;
        const int n_kind = like_new ? half : nq - half, at = like_new ? i : i - half;
        const double frac = n_kind > 1 ? double(at) / (n_kind - 1) : 1.0;
        if (like_new) {
            const float beta = float(0.3 + 0.5 * frac);
            for (int j = 0; j < d; ++j) moved[j] = x[j] + beta * (a[j] - b[j]);
        } else {
            double xx = 0, gg = 0;
            for (int j = 0; j < d; ++j) moved[j] = gauss(rng), gg += double(moved[j]) * moved[j], xx += double(x[j]) * x[j];
            const float scale = float((0.25 + 0.75 * frac) * std::sqrt(xx / std::max(gg, 1e-30)));
            for (int j = 0; j < d; ++j) moved[j] = x[j] + scale * moved[j];
        }
        double norm = 0;
        for (int j = 0; j < d; ++j) norm += double(moved[j]) * moved[j];
        if (norm == 0) std::copy(x, x + d, moved.begin());  // cancelled out: the key itself
        store.prepare(moved.data(), &q[size_t(i) * d]);
    }
    return q;
}

}  // namespace

Params tune(Index& index, const KeyStore& store, Tuning& t) {
    const size_t n = store.size();
    const std::vector<Params> ladder = index.ladder();
    t.tuned_at = n;
    t.untrained = ladder.empty();
    if (ladder.empty()) {  // the index answers exactly for now
        t.exact = true, t.recall = 1.0;
        return {};
    }
    const int d = store.dim(), k = Tuning::kTopK;
    const int nq = int(std::min<size_t>(Tuning::kSample, n));
    const std::vector<float> q = sample_queries(store, nq, 0x5EED ^ n);
    std::vector<TopK> truth(nq, TopK(k));
    exact_search_batch(store, q.data(), nq, nullptr, truth);
    std::vector<std::vector<uint32_t>> want(nq);
    for (int i = 0; i < nq; ++i)
        for (const auto& [score, slot] : truth[i].sorted()) want[i].push_back(slot);

    // exact search one query at a time, as a single search would run it
    auto t0 = std::chrono::steady_clock::now();
    const int n_exact = std::min(nq, 64);
    for (int i = 0; i < n_exact; ++i) {
        std::vector<TopK> one(1, TopK(k));
        exact_search_batch(store, &q[size_t(i) * d], 1, nullptr, one);
    }
    t.exact_us_per_query = 1e6 * seconds_since(t0) / n_exact;

    // (recall@10 of the harder kind of query, microseconds per query) of ladder rung i
    auto measure = [&](size_t i) {
        for (const auto& [key, value] : ladder[i]) index.set_param(key, value);
        size_t hits[2] = {0, 0}, total[2] = {0, 0};
        auto t1 = std::chrono::steady_clock::now();
        for (int j = 0; j < nq; ++j) {
            TopK top(k);
            index.search(&q[size_t(j) * d], nullptr, top);
            const int kind = j < nq / 2 ? 0 : 1;
            for (const auto& [score, slot] : top.sorted())
                hits[kind] += std::find(want[j].begin(), want[j].end(), slot) != want[j].end();
            total[kind] += want[j].size();
        }
        const double us = 1e6 * seconds_since(t1) / nq;
        double worst = 1.0;
        for (int kind = 0; kind < 2; ++kind)
            if (total[kind]) worst = std::min(worst, double(hits[kind]) / double(total[kind]));
        return std::pair<double, double>(worst, us);
    };
    // binary search for the first rung that reaches the target (recall grows along the ladder)
    size_t lo = 0, hi = ladder.size();  // the answer lies in [lo, hi]; hi: none does
    std::pair<double, double> at_hi{-1, 0};
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        const auto m = measure(mid);
        if (m.first >= t.target + Tuning::kMargin) hi = mid, at_hi = m;
        else lo = mid + 1;
    }
    if (hi < ladder.size() && at_hi.second <= t.exact_us_per_query) {
        t.exact = false, t.recall = at_hi.first, t.us_per_query = at_hi.second;
    } else {  // exact search: it reaches any target, and nothing cheaper did (the index keeps its best)
        hi = ladder.size() - 1;
        t.exact = true, t.recall = 1.0, t.us_per_query = t.exact_us_per_query;
    }
    for (const auto& [key, value] : ladder[hi]) index.set_param(key, value);
    return ladder[hi];
}

}  // namespace fm::memory
