// Per-layer neuron cache: a preallocated matrix of bundle rows that holds the neurons used
// recently ("LLM in a flash" windowing). Lookup is O(1) through slot_of; removal is O(1): the
// slot goes back on a free list, and no row moves (the compute reaches rows through pointers,
// so they need not be packed; moving the last row into the hole, as the paper does to keep one
// matrix, copied a bundle per eviction). Nothing is allocated per token.
//
// Each cached neuron remembers the step (token) it was last used. The window policy drops the
// neurons not used in the last `window` steps. When the cache is full, `admit` makes room for
// the neurons just read: by default it evicts the least recently used neurons that the current
// step does not use; with a hotness score (a decayed count of each neuron's picks) it keeps the
// hottest of the cached and the new neurons instead, so a neuron picked once does not push
// out one that is picked at most tokens.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/buffer.h"

namespace fm {

class NeuronCache {
  public:
    NeuronCache() = default;
    void init(int d_ff, int capacity, size_t row_bytes);  // allocates everything once

    int capacity() const { return capacity_; }
    int size() const { return size_; }  // neurons cached; their slots are anywhere in [0, capacity)
    size_t bytes() const;  // owned, rows and index
    int slot_of(int neuron) const { return slot_of_[neuron]; }
    int neuron_at(int slot) const { return neuron_of_[slot]; }  // -1: a free slot
    int64_t last_used(int slot) const { return last_used_[slot]; }
    char* row(int slot) const { return rows_.data<char>() + size_t(slot) * row_bytes_; }
    void touch(int slot, int64_t step) { last_used_[slot] = step; }

    // Drops the neurons last used before step `oldest_kept`.
    void expire(int64_t oldest_kept);
    // Frees up to `n` slots by evicting the least recently used neurons that are neither used
    // at `step` nor protected (protect[neuron] != 0); returns how many slots are free afterwards.
    int make_room(int n, int64_t step, const uint8_t* protect);
    // Gives `neuron` (not cached yet) a free slot and returns it, or -1 when there is none. Its
    // row is the caller's to fill (row(slot)) before the next lookup of it.
    int insert(int neuron, int64_t step);
    // Makes room for the n neurons just read (steps[neuron]: its last use) and gives them slots:
    // slots[j] for neurons[j], j < the count returned; the caller copies their rows in (in
    // parallel, SparseFfn::compute_round). hot == nullptr: LRU, make_room(n, step, protect) then
    // insert in order. Otherwise neurons must come in descending hot[] order: each takes a free
    // slot, else replaces the coldest unprotected cached neuron if that one is colder, else it and
    // the rest are left out.
    int admit(const int32_t* neurons, int n, int64_t step, const int64_t* steps, const uint8_t* protect,
              const float* hot, int32_t* slots);
    void clear();

  private:
    void remove_slot(int slot);
    // victims_ = the cached neurons neither used at `step` nor protected (candidates to evict)
    void collect_victims(int64_t step, const uint8_t* protect);

    int capacity_ = 0, size_ = 0;
    size_t row_bytes_ = 0;
    Buffer rows_;       // (capacity, row_bytes) bundle rows
    Buffer index_;      // slot_of (d_ff) | neuron_of (capacity) | free (capacity) int32 | last_used (capacity) int64
    int32_t* slot_of_ = nullptr;
    int32_t* neuron_of_ = nullptr;  // -1: free
    int32_t* free_ = nullptr;       // a stack of the capacity - size free slots
    int64_t* last_used_ = nullptr;
    std::vector<int32_t> victims_;  // scratch, reserved to capacity at init
};

}  // namespace fm
