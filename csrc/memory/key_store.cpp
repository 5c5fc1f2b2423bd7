#include "memory/key_store.h"

#include <cmath>

namespace fm::memory {

void KeyStore::prepare(const float* key, float* out) const {
    std::memcpy(out, key, sizeof(float) * dim_);
    if (metric_ == Metric::Cosine) {
        double ss = 0;
        for (int i = 0; i < dim_; ++i) ss += double(out[i]) * out[i];
        FM_ARG(ss > 0, "cosine metric: a key or query has zero norm");
        const float inv = float(1.0 / std::sqrt(ss));
        for (int i = 0; i < dim_; ++i) out[i] *= inv;
    }
}

void KeyStore::reserve(size_t n) {
    if (n <= capacity_) return;
    size_t cap = capacity_ ? capacity_ : 1024;
    while (cap < n) cap *= 2;
    Buffer grown(cap * dim_ * sizeof(float));
    if (keys_) std::memcpy(grown.data(), keys_, ids_.size() * dim_ * sizeof(float));
    owned_ = std::move(grown);
    keys_ = owned_.data<float>();
    capacity_ = cap;
}

uint32_t KeyStore::insert(int64_t id, const float* key) {
    uint32_t s;
    if (!free_.empty()) {
        s = free_.back();
        free_.pop_back();
    } else {
        FM_ARG(ids_.size() < UINT32_MAX - 1, "memory bank is full");
        reserve(ids_.size() + 1);
        s = uint32_t(ids_.size());
        ids_.push_back(0);
        live_.push_back(0);
    }
    ids_[s] = id;
    live_[s] = 1;
    overwrite(s, key);
    return s;
}

void KeyStore::erase(uint32_t s) {
    live_[s] = 0;
    ids_[s] = -1;
    free_.push_back(s);
}

void KeyStore::restore(std::vector<int64_t> ids, std::vector<uint8_t> live, const float* keys) {
    capacity_ = 0;
    keys_ = nullptr;
    ids_.clear();
    reserve(ids.size());
    std::memcpy(keys_, keys, ids.size() * dim_ * sizeof(float));
    restore_borrowed(std::move(ids), std::move(live), keys_);
}

void KeyStore::restore_borrowed(std::vector<int64_t> ids, std::vector<uint8_t> live, float* keys) {
    if (keys != owned_.data<float>()) {
        owned_.release();
        capacity_ = ids.size();  // growing beyond this copies into owned memory
    }
    keys_ = keys;
    ids_ = std::move(ids);
    live_ = std::move(live);
    free_.clear();
    for (uint32_t s = uint32_t(ids_.size()); s-- > 0;)
        if (!live_[s]) free_.push_back(s);
}

}  // namespace fm::memory
