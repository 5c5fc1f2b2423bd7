// IVF: a k-means coarse quantizer and one inverted list of slots per centroid; a query scans the
// lists of its nprobe best centroids. Until `train_size` entries have arrived the index answers
// exactly; it then trains (k-means on the entries, or a sample of 64 per list) and assigns every
// entry. Later entries go to their nearest centroid; when the bank has grown `retrain_growth`
// times past the size it was trained at, it trains again (so nlist keeps up with the data).
// Each list keeps a contiguous copy of its keys (as faiss's IndexIVFFlat does), so a probe
// streams memory instead of jumping between slots: twice the key memory, for scan speed.
// Parameters: nlist (0: 4*sqrt(n) at training), nprobe (0: 3*sqrt(nlist), at least 16),
// train_size, kmeans_iters, retrain_growth, seed.
#pragma once
#include "memory/index.h"

namespace fm::memory {

class IvfIndex final : public Index {
  public:
    IvfIndex(const KeyStore& store, const Params& p);
    const char* name() const override { return "ivf"; }
    void add(uint32_t slot) override;
    void remove(uint32_t slot) override;
    void search(const float* q, const AllowMask* allow, TopK& out) const override;
    void save(Writer& w) const override;
    void load(Reader& r) override;
    size_t memory_bytes() const override;
    void set_param(const std::string& key, double value) override;
    double get_param(const std::string& key) const override;
    std::vector<Params> ladder() const override;
    void train();  // k-means over the current entries, then assigns them all

  private:
    static constexpr uint32_t kNone = UINT32_MAX;
    uint32_t nearest(const float* x) const;
    void assign(uint32_t slot);
    int effective_nprobe() const;

    const KeyStore& store_;
    int nlist_param_, nprobe_, train_size_, iters_;
    double retrain_growth_;
    uint64_t seed_;
    int nlist_ = 0;                            // 0 until trained
    size_t trained_at_ = 0;                    // entries when last trained
    std::vector<float> centroids_;             // (nlist, dim)
    std::vector<std::vector<uint32_t>> lists_; // (nlist) slots
    std::vector<std::vector<float>> list_keys_; // (nlist) (list size, dim) copies of the keys
    std::vector<uint32_t> list_of_, pos_of_;   // (slots) where each slot sits
};

}  // namespace fm::memory
