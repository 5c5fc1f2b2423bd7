#include "ffn/neuron_cache.h"

#include <algorithm>
#include <cstring>

namespace fm {

void NeuronCache::init(int d_ff, int capacity, size_t row_bytes) {
    capacity_ = capacity;
    row_bytes_ = row_bytes;
    size_ = 0;
    rows_.allocate(size_t(capacity) * row_bytes);
    const size_t ints = sizeof(int32_t) * (size_t(d_ff) + 2 * size_t(capacity));
    index_.allocate(ints + sizeof(int64_t) * capacity + 8);
    slot_of_ = index_.data<int32_t>();
    neuron_of_ = slot_of_ + d_ff;
    free_ = neuron_of_ + capacity;
    last_used_ = reinterpret_cast<int64_t*>(index_.data<char>() + (ints + 7) / 8 * 8);
    std::fill(slot_of_, slot_of_ + d_ff, -1);
    std::fill(neuron_of_, neuron_of_ + capacity, -1);
    for (int i = 0; i < capacity; ++i) free_[i] = capacity - 1 - i;  // slot 0 is taken first
    victims_.clear();
    victims_.reserve(capacity);
}

size_t NeuronCache::bytes() const { return rows_.size() + index_.size() + victims_.capacity() * sizeof(int32_t); }

void NeuronCache::remove_slot(int slot) {
    slot_of_[neuron_of_[slot]] = -1;
    neuron_of_[slot] = -1;
    free_[capacity_ - size_] = slot;
    --size_;
}

void NeuronCache::collect_victims(int64_t step, const uint8_t* protect) {
    victims_.clear();
    for (int s = 0; s < capacity_; ++s)
        if (neuron_of_[s] >= 0 && last_used_[s] < step && !protect[neuron_of_[s]]) victims_.push_back(neuron_of_[s]);
}

void NeuronCache::expire(int64_t oldest_kept) {
    for (int s = 0; s < capacity_; ++s)
        if (neuron_of_[s] >= 0 && last_used_[s] < oldest_kept) remove_slot(s);
}

int NeuronCache::make_room(int n, int64_t step, const uint8_t* protect) {
    const int need = n - (capacity_ - size_);
    if (need > 0) {
        collect_victims(step, protect);
        const int k = std::min<int>(need, int(victims_.size()));
        // the k least recently used
        std::nth_element(victims_.begin(), victims_.begin() + (k ? k - 1 : 0), victims_.end(),
                         [&](int32_t a, int32_t b) { return last_used_[slot_of_[a]] < last_used_[slot_of_[b]]; });
        for (int i = 0; i < k; ++i) remove_slot(slot_of_[victims_[i]]);
    }
    return capacity_ - size_;
}

int NeuronCache::insert(int neuron, int64_t step) {
    if (size_ == capacity_) return -1;
    const int s = free_[capacity_ - 1 - size_++];  // the top of the stack
    neuron_of_[s] = neuron;
    slot_of_[neuron] = s;
    last_used_[s] = step;
    return s;
}

int NeuronCache::admit(const int32_t* neurons, int n, int64_t step, const int64_t* steps, const uint8_t* protect,
                       const float* hot, int32_t* slots) {
    if (!hot) {
        make_room(n, step, protect);
        int j = 0;
        for (; j < n; ++j)
            if ((slots[j] = insert(neurons[j], steps[neurons[j]])) < 0) break;
        return j;
    }
    collect_victims(step, protect);  // sorted coldest first
    std::sort(victims_.begin(), victims_.end(), [&](int32_t a, int32_t b) {  // coldest, then least recent, then id
        if (hot[a] != hot[b]) return hot[a] < hot[b];
        const int64_t ua = last_used_[slot_of_[a]], ub = last_used_[slot_of_[b]];
        return ua < ub || (ua == ub && a < b);
    });
    size_t v = 0;
    int j = 0;
    for (; j < n; ++j) {
        if (size_ == capacity_) {
            if (v == victims_.size() || !(hot[victims_[v]] < hot[neurons[j]])) break;
            remove_slot(slot_of_[victims_[v++]]);
        }
        slots[j] = insert(neurons[j], steps[neurons[j]]);
    }
    return j;
}

void NeuronCache::clear() {
    for (int s = 0; s < capacity_; ++s)
        if (neuron_of_[s] >= 0) remove_slot(s);
}

}  // namespace fm
