// HNSW (Malkov & Yashunin 2016): a navigable small-world graph in layers. Level-0 links live in
// one flat array (slot-major, fixed width), upper levels per node. Parameters: M (links per node,
// 2M on level 0), ef_construction, ef_search.
//
// Removal without unbounded degradation: the removed node's former neighbours are each
// reconnected, by the same selection heuristic as insertion, to the best of their remaining
// neighbours plus the removed node's neighbours; links that still point at a freed slot are
// skipped by search and dropped when their list is next rewritten; freed slots are reused by
// later inserts, so the graph does not accumulate dead nodes.
#pragma once
#include <random>

#include "memory/index.h"

namespace fm::memory {

class HnswIndex final : public Index {
  public:
    HnswIndex(const KeyStore& store, const Params& p);
    const char* name() const override { return "hnsw"; }
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
    using Scored = std::pair<float, uint32_t>;
    static constexpr uint32_t kNone = UINT32_MAX;

    uint32_t* links(uint32_t s, int level);  // [count, neighbours...]
    const uint32_t* links(uint32_t s, int level) const;
    int max_links(int level) const { return level == 0 ? 2 * M_ : M_; }
    bool in_graph(uint32_t s, int level) const { return s < level_.size() && level_[s] >= level; }
    void grow(uint32_t slot);
    // Best-first search of one level from `entry`; returns up to ef results, best first.
    std::vector<Scored> search_level(const float* q, const std::vector<Scored>& entry, int ef, int level) const;
    Scored greedy(const float* q, Scored cur, int from_level, int to_level) const;
    // The selection heuristic: up to m candidates, best first, skipping any that is closer to an
    // already selected one than to the base.
    std::vector<uint32_t> select(std::vector<Scored> cands, int m) const;
    void set_links(uint32_t s, int level, const std::vector<uint32_t>& nb);
    void connect(uint32_t from, uint32_t to, int level);  // adds to->from's list, shrinking if full

    const KeyStore& store_;
    int M_, ef_construction_, ef_search_;
    double level_mult_;
    std::mt19937_64 rng_;
    std::vector<int8_t> level_;          // (slots) top level of each node, -1 when not in the graph
    std::vector<uint32_t> links0_;       // (slots, 1 + 2M) level-0 links
    std::vector<std::vector<uint32_t>> upper_;  // per slot: (level, 1 + M) links of levels 1..level
    uint32_t entry_ = kNone;
    int max_level_ = -1;
};

}  // namespace fm::memory
