// Keys of a memory bank in stable slots: row s of `keys` holds the key of the entry in slot s.
// Removing an entry frees its slot (reused by a later add), so indexes can refer to slots
// that never move. Metric handling: cosine keys are stored normalised and searched by inner
// product; scores are always "larger is closer" (l2: minus the squared distance).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/error.h"
#include "kernels/cpu/kernels.h"

namespace fm::memory {

enum class Metric : int { Cosine = 0, IP = 1, L2 = 2 };

inline Metric metric_from_name(const std::string& s) {
    if (s == "cosine") return Metric::Cosine;
    if (s == "ip") return Metric::IP;
    if (s == "l2") return Metric::L2;
    FM_ARG(false, "unknown metric '", s, "' (expected cosine, ip or l2)");
}

inline const char* metric_name(Metric m) { return m == Metric::Cosine ? "cosine" : m == Metric::IP ? "ip" : "l2"; }

class KeyStore {
  public:
    KeyStore(int dim, Metric metric) : dim_(dim), metric_(metric) {}

    int dim() const { return dim_; }
    Metric metric() const { return metric_; }
    uint32_t high_water() const { return uint32_t(ids_.size()); }  // slots [0, high_water) exist
    size_t size() const { return ids_.size() - free_.size(); }
    bool live(uint32_t s) const { return s < ids_.size() && live_[s]; }
    int64_t id(uint32_t s) const { return ids_[s]; }
    const float* row(uint32_t s) const { return keys_ + size_t(s) * dim_; }

    // Asks for every cache line of slot s's key (a lone prefetch would fetch 64 of its bytes).
    void prefetch(uint32_t s) const {
        const char* p = reinterpret_cast<const char*>(row(s));
        for (size_t off = 0; off < size_t(dim_) * sizeof(float); off += 64) __builtin_prefetch(p + off);
    }

    // Similarity of a prepared query (see prepare) to slot s.
    float score(const float* q, uint32_t s) const {
        const Kernels& k = kernels();
        return metric_ == Metric::L2 ? -k.l2sq(q, row(s), dim_) : k.dot(q, row(s), dim_);
    }
    float score(const float* a, const float* b) const {
        const Kernels& k = kernels();
        return metric_ == Metric::L2 ? -k.l2sq(a, b, dim_) : k.dot(a, b, dim_);
    }

    // Copies a key into `out` as it is stored and searched (normalised for cosine).
    void prepare(const float* key, float* out) const;

    uint32_t insert(int64_t id, const float* key);  // returns the slot
    void overwrite(uint32_t s, const float* key) { prepare(key, keys_ + size_t(s) * dim_); }
    void erase(uint32_t s);

    // Persistence: the raw arrays (slots [0, high_water)).
    const float* keys_data() const { return keys_; }
    const std::vector<int64_t>& ids() const { return ids_; }
    const std::vector<uint8_t>& live_flags() const { return live_; }
    void restore(std::vector<int64_t> ids, std::vector<uint8_t> live, const float* keys);
    // Uses `keys` in place (a private, copy-on-write file mapping) until the store must grow.
    void restore_borrowed(std::vector<int64_t> ids, std::vector<uint8_t> live, float* keys);

  private:
    void reserve(size_t n);

    int dim_;
    Metric metric_;
    Buffer owned_;             // (capacity, dim) when the store owns its keys
    float* keys_ = nullptr;    // (capacity, dim): owned_ or a borrowed mapping
    size_t capacity_ = 0;
    std::vector<int64_t> ids_;     // (high_water) id of each slot
    std::vector<uint8_t> live_;    // (high_water) 1 where the slot holds an entry
    std::vector<uint32_t> free_;   // free slots, reused last-in first-out
};

}  // namespace fm::memory
