#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace fm {

void KvCache::allocate(std::vector<int> rows, int max_context, int slots, int kv_dim, DType dtype) {
    rows_ = std::move(rows);
    max_context_ = max_context, slots_ = slots, kv_dim_ = kv_dim, dtype_ = dtype;
    row_bytes_ = size_t(kv_dim) * dtype_size(dtype);
    first_.clear();
    size_t total = 0;
    for (int r : rows_) {
        first_.push_back(total);
        total += size_t(r);
    }
    keys_.allocate(total * slots * row_bytes_);
    values_.allocate(total * slots * row_bytes_);
    length_.assign(slots, 0);
    ids_.assign(slots, {});
}

int KvCache::reusable(int slot, const int64_t* ids, int n) const {
    const std::vector<int64_t>& held = ids_[slot];
    const int m = std::min(n, int(held.size()));
    int i = 0;
    while (i < m && held[i] == ids[i] && ids[i] != -1) ++i;
    return i;
}

void KvCache::store(int l, int slot, int pos, int n, const float* k, const float* v) {
    const int rows = rows_[l];
    char* kb = keys(l, slot);
    char* vb = values(l, slot);
    for (int t0 = 0; t0 < n;) {  // up to two runs of rows: a ring may wrap
        const int r = (pos + t0) % rows, m = std::min(n - t0, rows - r);
        const size_t count = size_t(m) * kv_dim_;
        const float* ks = k + size_t(t0) * kv_dim_;
        const float* vs = v + size_t(t0) * kv_dim_;
        if (dtype_ == DType::F32) {
            std::memcpy(kb + r * row_bytes_, ks, count * sizeof(float));
            std::memcpy(vb + r * row_bytes_, vs, count * sizeof(float));
        } else {
            kernels().to_f16(reinterpret_cast<uint16_t*>(kb + r * row_bytes_), ks, int(count));
            kernels().to_f16(reinterpret_cast<uint16_t*>(vb + r * row_bytes_), vs, int(count));
        }
        t0 += m;
    }
}

int KvCache::earliest_restart(int slot, const std::vector<int>& windows) const {
    int earliest = 0;
    for (size_t l = 0; l < rows_.size(); ++l)
        if (ring(int(l))) earliest = std::max(earliest, length_[slot] - rows_[l] + windows[l] - 1);
    return earliest;
}

}  // namespace fm
