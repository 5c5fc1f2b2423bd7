// Search settings tuned for a recall target on a sample of the bank's own keys, so that recall
// holds on data nobody tuned the constants for.
//
// Each approximate index lists its search settings cheapest first, recall growing along the list
// (Index::ladder: ef_search for hnsw, nprobe for ivf, probes and rerank_per_k for lsh). The tuner
// makes 256 queries from the stored keys, half like new data (a key moved by a fraction of the
// difference of two others), half noisy copies of keys (tuning.cpp), takes the exact top 10 of
// each as the truth, and binary-searches the ladder for the first setting whose recall@10 reaches
// the target plus a margin on both halves. Exact search is always
// a candidate: when no setting reaches the target, or the one that does is slower per query than
// exact search measured on the same queries, the bank answers exactly (Tuning::exact).
//
// The bank tunes when it first holds kMinEntries entries and again each time it has doubled since
// (MemoryBank::add), after a structural change (ivf training, lsh bits), and when the target is set.
#pragma once
#include <cstddef>
#include <cstdint>

#include "memory/index.h"

namespace fm::memory {

struct Tuning {
    static constexpr size_t kMinEntries = 1024;  // below this every index is about as fast as exact
    static constexpr int kSample = 256;          // queries drawn from the bank
    static constexpr int kTopK = 10;             // recall@10 is what the target means
    static constexpr double kMargin = 0.01;      // about two standard errors of the sample's recall

    double target = 0;       // recall@10 aimed at; 0: off (the index's settings are left alone)
    uint64_t tuned_at = 0;   // entries at the last tuning
    double recall = -1;      // recall@10 on the sample at the chosen setting (-1: not tuned)
    double us_per_query = 0; // the chosen setting's time per query on the sample
    double exact_us_per_query = 0;
    bool exact = false;      // exact search was chosen
    bool untrained = false;  // the index had nothing to tune yet (an ivf before training)

    bool due(size_t n) const { return target > 0 && n >= kMinEntries && n >= 2 * tuned_at; }
};

// The default target of an index (0.95 for hnsw and ivf, 0.9 for lsh, 0 for flat).
double default_target(const std::string& index_name);
// Whether `key` is a search setting the tuner owns (setting it by hand turns tuning off).
bool is_tuned_param(const std::string& key);

// Tunes `index` over `store` for t.target (> 0), records the result in t, and returns the
// settings it left the index with.
Params tune(Index& index, const KeyStore& store, Tuning& t);

}  // namespace fm::memory
