#include "memory/index.h"

#include <algorithm>
#include <cmath>

#include "memory/flat_index.h"
#include "memory/hnsw_index.h"
#include "memory/ivf_index.h"
#include "memory/lsh_index.h"

namespace fm::memory {

std::unique_ptr<Index> make_index(const std::string& name, const KeyStore& store, const Params& params) {
    static const std::map<std::string, std::vector<std::string>> known = {
        {"flat", {}},
        {"lsh", {"tables", "bits", "probes", "rerank", "rerank_per_k", "seed"}},
        {"ivf", {"nlist", "nprobe", "train_size", "kmeans_iters", "retrain_growth", "seed"}},
        {"hnsw", {"M", "ef_construction", "ef_search", "seed"}},
    };
    auto it = known.find(name);
    FM_ARG(it != known.end(), "unknown index '", name, "' (expected flat, lsh, ivf or hnsw)");
    for (const auto& [k, v] : params) {
        bool ok = false;
        for (const auto& n : it->second) ok = ok || n == k;
        FM_ARG(ok, "index '", name, "' has no parameter '", k, "'");
        FM_ARG(std::isfinite(v), "index parameter '", k, "' must be finite");
    }
    if (name == "flat") return std::make_unique<FlatIndex>(store);
    if (name == "lsh") return std::make_unique<LshIndex>(store, params);
    if (name == "ivf") return std::make_unique<IvfIndex>(store, params);
    return std::make_unique<HnswIndex>(store, params);
}

bool is_index_name(const std::string& name) {
    return name == "flat" || name == "lsh" || name == "ivf" || name == "hnsw";
}

void exact_search(const KeyStore& store, const float* q, const AllowMask* allow, TopK& out) {
    const uint32_t hw = store.high_water();
    for (uint32_t s = 0; s < hw; ++s) {
        if (!store.live(s) || (allow && !(*allow)[s])) continue;
        out.push(store.score(q, s), s);
    }
}

void exact_search_batch(const KeyStore& store, const float* Q, size_t nq, const AllowMask* allow,
                        std::vector<TopK>& tops) {
    // scores of a block of queries against a block of keys through the tiled matrix kernel
    constexpr size_t QB = 64, KB = 2048;
    const int d = store.dim();
    const uint32_t hw = store.high_water();
    const bool l2 = store.metric() == Metric::L2;
    const Kernels& K = kernels();
    std::vector<float> scores(QB * KB), scratch(scratch_floats(d)), qnorm(nq), knorm(KB);
    if (l2)
        for (size_t i = 0; i < nq; ++i) qnorm[i] = K.dot(Q + i * d, Q + i * d, d);
    for (uint32_t k0 = 0; k0 < hw; k0 += KB) {
        const uint32_t kb = std::min<uint32_t>(KB, hw - k0);
        if (l2)
            for (uint32_t j = 0; j < kb; ++j) knorm[j] = K.dot(store.row(k0 + j), store.row(k0 + j), d);
        for (size_t q0 = 0; q0 < nq; q0 += QB) {
            const size_t qb = std::min(QB, nq - q0);
            K.gemm[0](scores.data(), kb, Q + q0 * d, d, int(qb), store.row(k0), d, d, int(kb), scratch.data());
            for (size_t i = 0; i < qb; ++i) {
                TopK& top = tops[q0 + i];
                const float* sc = &scores[i * kb];
                for (uint32_t j = 0; j < kb; ++j) {
                    const uint32_t s = k0 + j;
                    const float v = l2 ? 2 * sc[j] - qnorm[q0 + i] - knorm[j] : sc[j];
                    if (v > top.worst() && store.live(s) && (!allow || (*allow)[s])) top.push(v, s);
                }
            }
        }
    }
}

}  // namespace fm::memory
