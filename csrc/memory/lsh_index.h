// LSH: random-hyperplane (SimHash) signatures in several tables, query-directed multi-probe
// (Lv et al. 2007: besides its own bucket, a query visits the buckets reached by flipping the
// bits whose projections lie closest to zero, best perturbation sets first), and exact re-ranking
// of the candidates in two stages: first by the Hamming distance between 512-bit SimHash
// sketches of the candidate and the query (8 popcounts, an estimate of the angle), then
// exactly for the best `rerank` of them. Parameters: tables, bits (0: chosen from the bank size, re-bucketed as it
// grows), probes (buckets visited per table), rerank (0: rerank_per_k * k),
// rerank_per_k (128), seed. Every slot keeps a 24-bit code per table
// (the signs of 24 projections); a table's bucket key is its first `bits` bits, so changing
// `bits` needs no new projections.
//
// Real embeddings share a strong common direction, which hyperplanes through the origin barely
// split, so the table hyperplanes pass through the mean of the keys (re-estimated, and the codes
// recomputed, each time the bank doubles). The ranking sketch keeps hyperplanes through the
// origin, whose Hamming distance estimates the true angle between query and key. Each bucket
// entry carries its sketch, so candidates are scanned sequentially, without a cache miss each.
#pragma once
#include <algorithm>
#include <atomic>
#include <unordered_map>

#include "memory/index.h"

namespace fm::memory {

class LshIndex final : public Index {
  public:
    static constexpr int kMaxBits = 24;
    static constexpr int kSketchWords = 8;  // 512-bit sketches
    LshIndex(const KeyStore& store, const Params& p);
    const char* name() const override { return "lsh"; }
    void add(uint32_t slot) override;
    void remove(uint32_t slot) override;
    void search(const float* q, const AllowMask* allow, TopK& out) const override;
    void save(Writer& w) const override;
    void load(Reader& r) override;
    size_t memory_bytes() const override;
    void set_param(const std::string& key, double value) override;
    double get_param(const std::string& key) const override;
    std::vector<Params> ladder() const override;

  private:
    void make_planes();
    int n_planes() const { return tables_ * kMaxBits + 64 * kSketchWords; }
    // (n_planes) projections of x: tables * kMaxBits for the tables, then 512 for the sketch
    void project(const float* x, float* proj) const;
    void encode(const float* proj, uint32_t slot);  // table codes and sketch of a slot
    uint32_t key(uint32_t code) const { return code & ((1u << bits_) - 1); }
    int auto_bits(size_t n) const;
    void rebucket();
    void recenter();  // mean of the live keys, then every code anew

    const KeyStore& store_;
    int tables_, bits_param_, probes_, rerank_, rerank_per_k_;
    uint64_t seed_;
    int bits_ = 1;
    std::vector<float> planes_;                  // (n_planes, dim): table planes, then sketch planes
    std::vector<float> center_;                  // (dim) where the hyperplanes cross
    std::vector<float> offset_;                  // (n_planes) planes . center
    size_t centered_at_ = 0;                     // entries when last re-centred
    mutable std::atomic<uint64_t> stat_queries_{0}, stat_candidates_{0};  // for candidates_per_query
    std::vector<uint32_t> codes_;                // (slots, tables)
    std::vector<uint64_t> sketch_;               // (slots, kSketchWords)
    struct Entry {
        uint32_t slot;
        uint64_t sketch[kSketchWords];
    };
    Entry entry(uint32_t s) const {
        Entry e{s, {}};
        std::copy(&sketch_[size_t(s) * kSketchWords], &sketch_[size_t(s) * kSketchWords] + kSketchWords, e.sketch);
        return e;
    }
    std::vector<std::unordered_map<uint32_t, std::vector<Entry>>> buckets_;  // (tables)
};

}  // namespace fm::memory
