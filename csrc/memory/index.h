// The interface every memory index implements, the factory that makes one by name, exact search
// (the reference for the approximate indexes), and top-k and search-time helpers.
// Indexes refer to KeyStore slots; the bank calls add/remove under its exclusive lock and
// search under its shared lock (so search must not modify the index).
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "memory/key_store.h"
#include "memory/serialize.h"

namespace fm::memory {

// The k best (score, slot) pairs seen so far: a min-heap on score.
class TopK {
  public:
    explicit TopK(int k) : k_(k) { heap_.reserve(k); }
    int k() const { return k_; }
    float worst() const { return int(heap_.size()) < k_ ? -3.0e38f : heap_.front().first; }
    void push(float score, uint32_t slot) {
        if (int(heap_.size()) < k_) {
            heap_.emplace_back(score, slot);
            std::push_heap(heap_.begin(), heap_.end(), greater);
        } else if (score > heap_.front().first) {
            std::pop_heap(heap_.begin(), heap_.end(), greater);
            heap_.back() = {score, slot};
            std::push_heap(heap_.begin(), heap_.end(), greater);
        }
    }
    std::vector<std::pair<float, uint32_t>> sorted() const {  // best first
        auto v = heap_;
        std::sort(v.begin(), v.end(), greater);
        return v;
    }

  private:
    static bool greater(const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
    int k_;
    std::vector<std::pair<float, uint32_t>> heap_;
};

// Per-thread "seen" marks over slots, cleared in O(1) by bumping an epoch.
class VisitedSet {
  public:
    void begin(size_t n) {
        if (tags_.size() < n) tags_.resize(n, 0);
        if (++epoch_ == 0) {
            std::fill(tags_.begin(), tags_.end(), 0);
            epoch_ = 1;
        }
    }
    bool test_and_set(uint32_t s) {
        if (tags_[s] == epoch_) return true;
        tags_[s] = epoch_;
        return false;
    }

  private:
    std::vector<uint32_t> tags_;
    uint32_t epoch_ = 0;
};

// Index parameters by name (M, ef_search, nprobe, tables, ...).
using Params = std::map<std::string, double>;

inline double param_or(const Params& p, const char* key, double dflt) {
    auto it = p.find(key);
    return it == p.end() ? dflt : it->second;
}

// Slots a filtered search may return (nullptr: all).
using AllowMask = std::vector<uint8_t>;

class Index {
  public:
    virtual ~Index() = default;
    virtual const char* name() const = 0;
    virtual void add(uint32_t slot) = 0;     // the slot's key is already in the store
    virtual void remove(uint32_t slot) = 0;  // called before the store frees the slot
    // q is prepared (normalised for cosine). Adds the best candidates to `out`.
    virtual void search(const float* q, const AllowMask* allow, TopK& out) const = 0;
    virtual void save(Writer& w) const = 0;
    virtual void load(Reader& r) = 0;  // after the store is restored
    virtual size_t memory_bytes() const = 0;
    virtual void set_param(const std::string& key, double value) = 0;
    virtual double get_param(const std::string& key) const = 0;
    // Search settings to try when tuning for a recall target (tuning.h), cheapest first, recall
    // growing along the list. Empty: nothing to tune (flat, an ivf not yet trained).
    virtual std::vector<Params> ladder() const { return {}; }
};

// The index `name` (flat, lsh, ivf or hnsw) over `store`; unknown names and parameters raise.
std::unique_ptr<Index> make_index(const std::string& name, const KeyStore& store, const Params& params);
bool is_index_name(const std::string& name);

// Exact search over every live slot: the reference for the approximate indexes.
void exact_search(const KeyStore& store, const float* q, const AllowMask* allow, TopK& out);
// The same for nq prepared queries Q (nq, dim) at once, through the matrix kernel (the flat
// index's path, and filtered searches): adds each query's candidates to tops[i].
void exact_search_batch(const KeyStore& store, const float* Q, size_t nq, const AllowMask* allow,
                        std::vector<TopK>& tops);

}  // namespace fm::memory
