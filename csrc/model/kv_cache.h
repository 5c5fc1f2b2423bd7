// The KV cache: keys and values of every layer for `slots` sequences, each with its own length.
//
// Layout: per layer, per slot, `rows(l)` rows of kv_dim in the cache's dtype (f32 or f16). A layer
// attending to all positions has max_context rows (position p in row p); a layer with a sliding
// window of W keeps a ring of W + chunk rows (position p in row p % rows), which a chunk of new
// positions never overwrites while still needed. Slots are fixed-size (not pages): a slot holds
// one sequence up to max_context, and every slot is allocated when the cache is made, so the
// DRAM budget counts them all.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/buffer.h"
#include "core/dtype.h"

namespace fm {

class KvCache {
  public:
    // rows: per layer (max_context, or fewer for a ring); slots >= 1.
    void allocate(std::vector<int> rows, int max_context, int slots, int kv_dim, DType dtype);

    int slots() const { return slots_; }
    int rows(int layer) const { return rows_[layer]; }
    bool ring(int layer) const { return rows_[layer] < max_context_; }
    DType dtype() const { return dtype_; }
    size_t bytes() const { return keys_.size() + values_.size(); }

    // Positions [0, length) of the slot's sequence are held (a ring: only its last rows). Setting
    // it drops the identities past n; positions it adds have none (-1) until set_identity.
    int length(int slot) const { return length_[slot]; }
    void set_length(int slot, int n) {
        length_[slot] = n;
        ids_[slot].resize(size_t(n), -1);
    }
    // Prefix identity: what each held position holds, so that a new sequence reuses the entries of
    // the longest prefix it shares: a token id (>= 0), an input embedding's identity (<= -2, its
    // content's hash), or -1 (unknown: never equal).
    void set_identity(int slot, int pos, int64_t id) { ids_[slot][size_t(pos)] = id; }
    // How many leading positions of ids (n) the slot holds.
    int reusable(int slot, const int64_t* ids, int n) const;

    // The first row of layer l's rows for `slot` ((rows(l), kv_dim), in dtype()).
    char* keys(int l, int slot) { return keys_.data<char>() + offset(l, slot); }
    char* values(int l, int slot) { return values_.data<char>() + offset(l, slot); }
    const char* keys(int l, int slot) const { return keys_.data<char>() + offset(l, slot); }
    const char* values(int l, int slot) const { return values_.data<char>() + offset(l, slot); }

    // Writes n f32 rows of keys and values (each kv_dim, consecutive) for positions [pos, pos + n)
    // of the slot's sequence into layer l (converted to f16 if the cache holds f16).
    void store(int l, int slot, int pos, int n, const float* k, const float* v);

    // The earliest position > 0 the slot's sequence may restart from (0 always works): a ring of R
    // rows for a window of W holds positions [length - R, length); restarting at s needs positions
    // from s - W + 1 on. windows: per layer (0: none).
    int earliest_restart(int slot, const std::vector<int>& windows) const;

  private:
    size_t offset(int l, int slot) const { return (first_[l] * slots_ + size_t(slot) * rows_[l]) * row_bytes_; }

    Buffer keys_, values_;
    std::vector<size_t> first_;  // per layer: rows of the layers before it, per slot
    std::vector<int> rows_;
    std::vector<int> length_;
    std::vector<std::vector<int64_t>> ids_;  // per slot: (length) position identities
    int slots_ = 0, kv_dim_ = 0, max_context_ = 0;
    size_t row_bytes_ = 0;
    DType dtype_ = DType::F32;
};

}  // namespace fm
