// A long-term memory store: entries with an int64 id, a key vector, and an optional payload
// (value array of n_slots x d_value continuous embeddings in f16/f32, text, JSON metadata,
// timestamps), searchable through one index: flat (exact), lsh, ivf or hnsw.
//
// Thread safety: one readers-writer lock. Searches take it shared and run in parallel; add,
// update, remove and merge take it exclusively. Persistence: see save().
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "io/file.h"
#include "memory/index.h"
#include "memory/key_store.h"
#include "memory/tuning.h"

namespace fm::memory {

struct Entry {
    DType value_dtype = DType::F32;
    int32_t n_slots = 0, d_value = 0;  // value: (n_slots, d_value), empty when n_slots == 0
    std::vector<uint8_t> value;
    std::string text;
    std::string metadata;  // JSON, written and read by the Python layer
    double created = 0, updated = 0;  // seconds since the epoch

    void check(const std::string& where) const;  // the value's bytes match its shape
};

class MemoryBank {
  public:
    static constexpr int kMaxDim = 1 << 16;

    MemoryBank(int dim, const std::string& metric, const std::string& index, const Params& params);

    int dim() const { return store_.dim(); }
    std::string metric() const { return metric_name(store_.metric()); }
    std::string index_name() const { return index_->name(); }
    size_t size() const;
    bool contains(int64_t id) const;
    std::vector<int64_t> ids() const;  // in slot order
    std::vector<std::pair<int64_t, std::string>> metadata_all() const { return field_all(&Entry::metadata); }
    std::vector<std::pair<int64_t, std::string>> texts_all() const { return field_all(&Entry::text); }

    // Adds n entries. ids: explicit (must be new and distinct) or nullptr for fresh ones.
    // Everything is validated before the bank changes. Returns the ids.
    std::vector<int64_t> add(const float* keys, size_t n, const int64_t* ids, std::vector<Entry> entries);
    Entry get(int64_t id, float* key_out) const;  // key_out: (dim) as stored (normalised for cosine)
    void update(int64_t id, const float* key, const Entry* value, const std::string* text,
                const std::string* metadata);
    void remove(const int64_t* ids, size_t n);
    // Removes `ids` and adds one entry in their place, atomically (merge).
    int64_t replace(const int64_t* ids, size_t n, const float* key, std::optional<int64_t> new_id, Entry entry);

    // For each of nq queries, the k best (ids, scores), padded with id -1 / score -inf.
    // allow: optional id allow-list.
    void search(const float* queries, size_t nq, int k, const std::vector<int64_t>* allow, int64_t* out_ids,
                float* out_scores) const;

    // Index parameters, and the bank's own: target_recall (settable; 0 turns tuning off, and
    // setting a tuned search parameter by hand does too), tuned_recall, tuned_exact, tuned_at,
    // tuned_us_per_query, exact_us_per_query (read-only; see tuning.h).
    void set_param(const std::string& key, double value);
    double get_param(const std::string& key) const;
    size_t memory_bytes() const;

    // Atomic save, and load (with mmap the keys are used from a private, copy-on-write mapping of
    // the file); the format is in bank_file.h, the code in bank_file.cpp.
    void save(const std::string& path) const;
    static std::unique_ptr<MemoryBank> load(const std::string& path, bool mmap);

  private:
    // (id, entry.*field) of every live entry, in slot order
    std::vector<std::pair<int64_t, std::string>> field_all(std::string Entry::*field) const;
    MemoryBank(int dim, Metric metric);
    uint32_t slot_of(int64_t id) const;
    void check_key(const float* key, size_t row, const char* what) const;
    void insert_locked(int64_t id, const float* key, Entry entry);
    void remove_locked(int64_t id);
    void parse(Reader& r, uint8_t* payload_base, bool borrow_keys, uint32_t version);
    void maybe_tune_locked();  // tunes the search settings when the bank has grown enough

    FileMapping mapping_;  // the file the keys are borrowed from (load with mmap); outlives the store
    mutable std::shared_mutex mu_;
    KeyStore store_;
    std::unique_ptr<Index> index_;
    Tuning tuning_;
    Params search_params_;  // the tuned search settings as last set (by the tuner or by hand); saved
    std::vector<Entry> entries_;  // by slot
    std::unordered_map<int64_t, uint32_t> slot_;
    int64_t next_id_ = 0;
};

}  // namespace fm::memory
