#include "memory/memory_bank.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <unordered_set>

namespace fm::memory {

namespace {
double now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

void Entry::check(const std::string& where) const {
    FM_ARG(n_slots >= 0 && d_value >= 0, where, ": negative value shape");
    FM_ARG(value.size() == size_t(n_slots) * d_value * dtype_size(value_dtype), where, ": value holds ",
           value.size(), " bytes, its shape (", n_slots, ", ", d_value, ") needs ",
           size_t(n_slots) * d_value * dtype_size(value_dtype));
}

MemoryBank::MemoryBank(int dim, Metric metric) : store_(dim, metric) {}

MemoryBank::MemoryBank(int dim, const std::string& metric, const std::string& index, const Params& params)
    : store_(dim, metric_from_name(metric)) {
    FM_ARG(dim > 0 && dim <= kMaxDim, "dim must be in [1, ", kMaxDim, "], got ", dim);
    Params index_params = params;
    index_params.erase("target_recall");
    index_ = make_index(index, store_, index_params);
    for (const auto& [key, value] : index_params)
        if (is_tuned_param(key)) search_params_[key] = value;
    tuning_.target = search_params_.empty() ? default_target(index) : 0;
    if (auto it = params.find("target_recall"); it != params.end()) {
        FM_ARG(search_params_.empty(), "give target_recall or the search settings it tunes (",
               search_params_.begin()->first, "), not both");
        FM_ARG(it->second >= 0 && it->second <= 1, "target_recall must be in [0, 1] (0: off), got ", it->second);
        tuning_.target = index == "flat" ? 0 : it->second;
    }
}

void MemoryBank::maybe_tune_locked() {
    if (tuning_.due(store_.size()) || (tuning_.target > 0 && tuning_.untrained && !index_->ladder().empty())) {
        Params chosen = tune(*index_, store_, tuning_);
        for (const auto& [key, value] : chosen) search_params_[key] = value;
    }
}

size_t MemoryBank::size() const {
    std::shared_lock lk(mu_);
    return store_.size();
}

bool MemoryBank::contains(int64_t id) const {
    std::shared_lock lk(mu_);
    return slot_.count(id) > 0;
}

std::vector<int64_t> MemoryBank::ids() const {
    std::shared_lock lk(mu_);
    std::vector<int64_t> out;
    out.reserve(store_.size());
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s)) out.push_back(store_.id(s));
    return out;
}

std::vector<std::pair<int64_t, std::string>> MemoryBank::field_all(std::string Entry::*field) const {
    std::shared_lock lk(mu_);
    std::vector<std::pair<int64_t, std::string>> out;
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s)) out.emplace_back(store_.id(s), entries_[s].*field);
    return out;
}

uint32_t MemoryBank::slot_of(int64_t id) const {
    auto it = slot_.find(id);
    FM_ARG(it != slot_.end(), "unknown memory id ", id);
    return it->second;
}

void MemoryBank::check_key(const float* key, size_t row, const char* what) const {
    for (int i = 0; i < dim(); ++i)
        FM_ARG(std::isfinite(key[i]), what, " row ", row, " has a non-finite value at column ", i);
}

void MemoryBank::insert_locked(int64_t id, const float* key, Entry entry) {
    const uint32_t s = store_.insert(id, key);
    if (entries_.size() <= s) entries_.resize(s + 1);
    entries_[s] = std::move(entry);
    slot_[id] = s;
    index_->add(s);
}

void MemoryBank::remove_locked(int64_t id) {
    const uint32_t s = slot_of(id);
    index_->remove(s);
    store_.erase(s);
    entries_[s] = Entry{};
    slot_.erase(id);
}

std::vector<int64_t> MemoryBank::add(const float* keys, size_t n, const int64_t* ids, std::vector<Entry> entries) {
    FM_ARG(entries.empty() || entries.size() == n, "got ", entries.size(), " payloads for ", n, " keys");
    for (size_t i = 0; i < n; ++i) check_key(keys + i * dim(), i, "keys");
    for (size_t i = 0; i < entries.size(); ++i) entries[i].check("entry " + std::to_string(i));
    if (store_.metric() == Metric::Cosine)
        for (size_t i = 0; i < n; ++i) {
            double ss = 0;
            for (int j = 0; j < dim(); ++j) ss += double(keys[i * dim() + j]) * keys[i * dim() + j];
            FM_ARG(ss > 0, "keys row ", i, " has zero norm (cosine metric)");
        }
    std::unique_lock lk(mu_);
    std::vector<int64_t> out(n);
    if (ids) {
        std::unordered_set<int64_t> seen;
        for (size_t i = 0; i < n; ++i) {
            FM_ARG(ids[i] >= 0, "ids must be >= 0, got ", ids[i]);
            FM_ARG(!slot_.count(ids[i]), "id ", ids[i], " already exists");
            FM_ARG(seen.insert(ids[i]).second, "id ", ids[i], " given twice");
            out[i] = ids[i];
        }
    } else {
        for (size_t i = 0; i < n; ++i) out[i] = next_id_++;
    }
    const double t = now();
    for (size_t i = 0; i < n; ++i) {
        Entry e = entries.empty() ? Entry{} : std::move(entries[i]);
        e.created = e.updated = t;
        insert_locked(out[i], keys + i * dim(), std::move(e));
        if (out[i] >= next_id_) next_id_ = out[i] + 1;
    }
    maybe_tune_locked();
    return out;
}

Entry MemoryBank::get(int64_t id, float* key_out) const {
    std::shared_lock lk(mu_);
    const uint32_t s = slot_of(id);
    std::memcpy(key_out, store_.row(s), sizeof(float) * dim());
    return entries_[s];
}

void MemoryBank::update(int64_t id, const float* key, const Entry* value, const std::string* text,
                        const std::string* metadata) {
    if (key) check_key(key, 0, "key");
    if (value) value->check("value");
    std::unique_lock lk(mu_);
    const uint32_t s = slot_of(id);
    Entry& e = entries_[s];
    if (key) {
        index_->remove(s);
        store_.overwrite(s, key);
        index_->add(s);
    }
    if (value) e.value = value->value, e.value_dtype = value->value_dtype, e.n_slots = value->n_slots,
               e.d_value = value->d_value;
    if (text) e.text = *text;
    if (metadata) e.metadata = *metadata;
    e.updated = now();
}

void MemoryBank::remove(const int64_t* ids, size_t n) {
    std::unique_lock lk(mu_);
    std::unordered_set<int64_t> seen;
    for (size_t i = 0; i < n; ++i) {
        slot_of(ids[i]);  // all ids are checked before anything is removed
        FM_ARG(seen.insert(ids[i]).second, "id ", ids[i], " given twice");
    }
    for (size_t i = 0; i < n; ++i) remove_locked(ids[i]);
}

int64_t MemoryBank::replace(const int64_t* ids, size_t n, const float* key, std::optional<int64_t> new_id,
                            Entry entry) {
    check_key(key, 0, "key");
    entry.check("merged value");
    std::unique_lock lk(mu_);
    std::unordered_set<int64_t> seen;
    double created = now();
    for (size_t i = 0; i < n; ++i) {
        created = std::min(created, entries_[slot_of(ids[i])].created);
        FM_ARG(seen.insert(ids[i]).second, "id ", ids[i], " given twice");
    }
    int64_t id = new_id ? *new_id : next_id_++;
    FM_ARG(id >= 0, "ids must be >= 0, got ", id);
    FM_ARG(!slot_.count(id) || seen.count(id), "id ", id, " already exists");
    for (size_t i = 0; i < n; ++i) remove_locked(ids[i]);
    entry.created = created;
    entry.updated = now();
    insert_locked(id, key, std::move(entry));
    if (id >= next_id_) next_id_ = id + 1;
    maybe_tune_locked();
    return id;
}

void MemoryBank::search(const float* queries, size_t nq, int k, const std::vector<int64_t>* allow, int64_t* out_ids,
                        float* out_scores) const {
    FM_ARG(k > 0, "k must be positive, got ", k);
    for (size_t i = 0; i < nq; ++i) check_key(queries + i * dim(), i, "queries");
    std::shared_lock lk(mu_);
    AllowMask mask;
    size_t n_allowed = 0;
    if (allow) {
        mask.assign(store_.high_water(), 0);
        for (int64_t id : *allow) {
            auto it = slot_.find(id);
            if (it != slot_.end() && !mask[it->second]) mask[it->second] = 1, ++n_allowed;
        }
    }
    // A selective filter is answered exactly over the allowed entries; a broad one through the
    // index, falling back to exact search when the index finds fewer than k allowed entries.
    const bool exact = (allow && n_allowed <= std::max<size_t>(size_t(k) * 64, store_.size() / 16)) ||
                       index_->name() == std::string("flat") || tuning_.exact;
    std::vector<float> prepared(nq * dim());
    for (size_t i = 0; i < nq; ++i) store_.prepare(queries + i * dim(), &prepared[i * dim()]);
    std::vector<TopK> tops(nq, TopK(k));
    if (exact) exact_search_batch(store_, prepared.data(), nq, allow ? &mask : nullptr, tops);
    const size_t want = std::min<size_t>(k, allow ? n_allowed : store_.size());
    for (size_t i = 0; i < nq; ++i) {
        const float* qi = &prepared[i * dim()];
        if (!exact) index_->search(qi, allow ? &mask : nullptr, tops[i]);
        auto best = tops[i].sorted();
        if (best.size() < want) {  // the index found too few (a filter, or a small or untrained index)
            TopK full(k);
            exact_search(store_, qi, allow ? &mask : nullptr, full);
            best = full.sorted();
        }
        for (int j = 0; j < k; ++j) {
            const bool have = j < int(best.size());
            out_ids[i * k + j] = have ? store_.id(best[j].second) : -1;
            out_scores[i * k + j] = have ? best[j].first : -INFINITY;
        }
    }
}

void MemoryBank::set_param(const std::string& key, double value) {
    std::unique_lock lk(mu_);
    if (key == "target_recall") {
        FM_ARG(value >= 0 && value <= 1, "target_recall must be in [0, 1] (0: off), got ", value);
        tuning_ = Tuning{};
        tuning_.target = index_->name() == std::string("flat") ? 0 : value;
        maybe_tune_locked();
        return;
    }
    index_->set_param(key, value);
    if (is_tuned_param(key)) {  // by hand: the user's setting stands
        search_params_[key] = value;
        tuning_.target = 0, tuning_.exact = false;
    } else if (key == "train" || key == "bits") {  // a new structure needs new settings
        tuning_.tuned_at = 0;
        maybe_tune_locked();
    }
}

double MemoryBank::get_param(const std::string& key) const {
    std::shared_lock lk(mu_);
    if (key == "target_recall") return tuning_.target;
    if (key == "tuned_recall") return tuning_.recall;
    if (key == "tuned_exact") return tuning_.exact;
    if (key == "tuned_at") return double(tuning_.tuned_at);
    if (key == "tuned_us_per_query") return tuning_.us_per_query;
    if (key == "exact_us_per_query") return tuning_.exact_us_per_query;
    return index_->get_param(key);
}

size_t MemoryBank::memory_bytes() const {
    std::shared_lock lk(mu_);
    size_t n = size_t(store_.high_water()) * (dim() * sizeof(float) + sizeof(int64_t) + 1) +
               slot_.size() * (sizeof(int64_t) + sizeof(uint32_t) + 16) + entries_.size() * sizeof(Entry);
    for (const Entry& e : entries_) n += e.value.size() + e.text.size() + e.metadata.size();
    return n + index_->memory_bytes();
}

}  // namespace fm::memory
