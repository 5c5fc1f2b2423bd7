#include "memory/memory_bank.h"

#include "io/file.h"

#include "memory/hnsw_index.h"
#include "memory/ivf_index.h"
#include "memory/lsh_index.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_set>

namespace fm::memory {

namespace {
constexpr char kMagic[8] = {'F', 'M', 'B', 'A', 'N', 'K', 0, 0};
constexpr uint32_t kVersion = 1;
constexpr size_t kPreamble = 64;
constexpr int kMaxDim = 1 << 16;

double now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void check_entry(const Entry& e, const std::string& where) {
    FM_ARG(e.n_slots >= 0 && e.d_value >= 0, where, ": negative value shape");
    FM_ARG(e.value.size() == size_t(e.n_slots) * e.d_value * dtype_size(e.value_dtype), where,
           ": value holds ", e.value.size(), " bytes, its shape (", e.n_slots, ", ", e.d_value, ") needs ",
           size_t(e.n_slots) * e.d_value * dtype_size(e.value_dtype));
}
}  // namespace

namespace {
class FlatIndex final : public Index {
  public:
    explicit FlatIndex(const KeyStore& store) : store_(store) {}
    const char* name() const override { return "flat"; }
    void add(uint32_t) override {}
    void remove(uint32_t) override {}
    void search(const float* q, const AllowMask* allow, TopK& out) const override {
        exact_search(store_, q, allow, out);
    }
    void save(Writer&) const override {}
    void load(Reader&) override {}
    size_t memory_bytes() const override { return 0; }
    void set_param(const std::string& key, double) override { FM_ARG(false, "flat: no parameter '", key, "'"); }
    double get_param(const std::string& key) const override { FM_ARG(false, "flat: no parameter '", key, "'"); }

  private:
    const KeyStore& store_;
};
}  // namespace

std::unique_ptr<Index> make_index(const std::string& name, const KeyStore& store, const Params& params) {
    static const std::map<std::string, std::vector<std::string>> known = {
        {"flat", {}},
        {"lsh", {"tables", "bits", "probes", "rerank", "seed"}},
        {"ivf", {"nlist", "nprobe", "train_size", "kmeans_iters", "retrain_growth", "seed"}},
        {"hnsw", {"M", "ef_construction", "ef_search", "seed"}},
    };
    auto it = known.find(name);
    FM_ARG(it != known.end(), "unknown index '", name, "' (expected flat, lsh, ivf or hnsw)");
    for (const auto& [k, v] : params) {
        bool ok = false;
        for (const auto& n : it->second) ok = ok || n == k;
        FM_ARG(ok, "index '", name, "' has no parameter '", k, "'");
        FM_ARG(std::isfinite(v), "index parameter '", k, "' must be finite");
    }
    if (name == "flat") return std::make_unique<FlatIndex>(store);
    if (name == "lsh") return std::make_unique<LshIndex>(store, params);
    if (name == "ivf") return std::make_unique<IvfIndex>(store, params);
    return std::make_unique<HnswIndex>(store, params);
}

uint64_t checksum64(const uint8_t* p, size_t n) {
    uint64_t h = 0x243F6A8885A308D3ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        h ^= w * 0x9E3779B97F4A7C15ull;
        h = ((h << 31) | (h >> 33)) * 0xBF58476D1CE4E5B9ull;
    }
    for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
    h ^= h >> 29;
    return h * 0x94D049BB133111EBull;
}

void exact_search(const KeyStore& store, const float* q, const AllowMask* allow, TopK& out) {
    const uint32_t hw = store.high_water();
    for (uint32_t s = 0; s < hw; ++s) {
        if (!store.live(s) || (allow && !(*allow)[s])) continue;
        out.push(store.score(q, s), s);
    }
}

void exact_search_batch(const KeyStore& store, const float* Q, size_t nq, const AllowMask* allow,
                        std::vector<TopK>& tops) {
    // scores of a block of queries against a block of keys through the tiled matrix kernel
    constexpr size_t QB = 64, KB = 2048;
    const int d = store.dim();
    const uint32_t hw = store.high_water();
    const bool l2 = store.metric() == Metric::L2;
    const Kernels& K = kernels();
    std::vector<float> scores(QB * KB), scratch(scratch_floats(d)), qnorm(nq), knorm(KB);
    if (l2)
        for (size_t i = 0; i < nq; ++i) qnorm[i] = K.dot(Q + i * d, Q + i * d, d);
    for (uint32_t k0 = 0; k0 < hw; k0 += KB) {
        const uint32_t kb = std::min<uint32_t>(KB, hw - k0);
        if (l2)
            for (uint32_t j = 0; j < kb; ++j) knorm[j] = K.dot(store.row(k0 + j), store.row(k0 + j), d);
        for (size_t q0 = 0; q0 < nq; q0 += QB) {
            const size_t qb = std::min(QB, nq - q0);
            K.gemm[0](scores.data(), kb, Q + q0 * d, d, int(qb), store.row(k0), d, d, int(kb), scratch.data());
            for (size_t i = 0; i < qb; ++i) {
                TopK& top = tops[q0 + i];
                const float* sc = &scores[i * kb];
                for (uint32_t j = 0; j < kb; ++j) {
                    const uint32_t s = k0 + j;
                    const float v = l2 ? 2 * sc[j] - qnorm[q0 + i] - knorm[j] : sc[j];
                    if (v > top.worst() && store.live(s) && (!allow || (*allow)[s])) top.push(v, s);
                }
            }
        }
    }
}

MemoryBank::MemoryBank(int dim, Metric metric) : store_(dim, metric) {}

MemoryBank::MemoryBank(int dim, const std::string& metric, const std::string& index, const Params& params)
    : store_(dim, metric_from_name(metric)) {
    FM_ARG(dim > 0 && dim <= kMaxDim, "dim must be in [1, ", kMaxDim, "], got ", dim);
    index_ = make_index(index, store_, params);
}

MemoryBank::~MemoryBank() {
    if (mapping_) ::munmap(mapping_, mapping_size_);
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

std::vector<std::pair<int64_t, std::string>> MemoryBank::metadata_all() const {
    std::shared_lock lk(mu_);
    std::vector<std::pair<int64_t, std::string>> out;
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s)) out.emplace_back(store_.id(s), entries_[s].metadata);
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
    for (size_t i = 0; i < entries.size(); ++i) check_entry(entries[i], "entry " + std::to_string(i));
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
    if (value) check_entry(*value, "value");
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
    check_entry(entry, "merged value");
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
                       index_->name() == std::string("flat");
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
    index_->set_param(key, value);
}

double MemoryBank::get_param(const std::string& key) const {
    std::shared_lock lk(mu_);
    return index_->get_param(key);
}

size_t MemoryBank::memory_bytes() const {
    std::shared_lock lk(mu_);
    size_t n = size_t(store_.high_water()) * (dim() * sizeof(float) + sizeof(int64_t) + 1) +
               slot_.size() * (sizeof(int64_t) + sizeof(uint32_t) + 16) + entries_.size() * sizeof(Entry);
    for (const Entry& e : entries_) n += e.value.size() + e.text.size() + e.metadata.size();
    return n + index_->memory_bytes();
}

// --- persistence -----------------------------------------------------------------------------

void MemoryBank::save(const std::string& path) const {
    Writer w;
    {
        std::shared_lock lk(mu_);
        w.put<uint32_t>(uint32_t(dim()));
        w.put<uint32_t>(uint32_t(store_.metric()));
        w.str(index_->name());
        w.put<int64_t>(next_id_);
        w.vec(store_.ids());
        w.vec(store_.live_flags());
        w.align(64);
        w.bytes(store_.keys_data(), size_t(store_.high_water()) * dim() * sizeof(float));
        for (uint32_t s = 0; s < store_.high_water(); ++s) {
            if (!store_.live(s)) continue;
            const Entry& e = entries_[s];
            w.put<uint32_t>(uint32_t(e.value_dtype));
            w.put<int32_t>(e.n_slots);
            w.put<int32_t>(e.d_value);
            w.vec(e.value);
            w.str(e.text);
            w.str(e.metadata);
            w.put<double>(e.created);
            w.put<double>(e.updated);
        }
        index_->save(w);
    }
    uint8_t pre[kPreamble] = {};
    std::memcpy(pre, kMagic, 8);
    const uint64_t len = w.buf.size(), sum = checksum64(w.buf.data(), w.buf.size());
    std::memcpy(pre + 8, &kVersion, 4);
    std::memcpy(pre + 16, &len, 8);
    std::memcpy(pre + 24, &sum, 8);

    const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" +
                            std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()));
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    FM_IO(fd >= 0, "cannot create '", tmp, "': ", std::strerror(errno));
    auto write_all = [&](const uint8_t* p, size_t n) {
        while (n > 0) {
            ssize_t r = ::write(fd, p, n);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                int e = errno;
                ::close(fd);
                ::unlink(tmp.c_str());
                FM_IO(false, "cannot write '", tmp, "': ", std::strerror(e));
            }
            p += r, n -= size_t(r);
        }
    };
    write_all(pre, kPreamble);
    write_all(w.buf.data(), w.buf.size());
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
        ::unlink(tmp.c_str());
        FM_IO(false, "cannot flush '", tmp, "': ", std::strerror(errno));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int e = errno;
        ::unlink(tmp.c_str());
        FM_IO(false, "cannot rename '", tmp, "' to '", path, "': ", std::strerror(e));
    }
    std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

std::unique_ptr<MemoryBank> MemoryBank::load(const std::string& path, bool use_mmap) {
    uint64_t file_size = 0;
    int fd = open_read(path, &file_size);
    const size_t size = size_t(file_size);
    uint8_t* base = nullptr;
    std::vector<uint8_t> data;
    if (size < kPreamble) {
        ::close(fd);
        FM_ARG(false, path, ": not a memory bank (", size, " bytes)");
    }
    if (use_mmap) {
        void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        ::close(fd);
        FM_IO(m != MAP_FAILED, "cannot map '", path, "': ", std::strerror(errno));
        base = static_cast<uint8_t*>(m);
    } else {
        data.resize(size);
        size_t got = 0;
        while (got < size) {
            ssize_t r = ::pread(fd, data.data() + got, size - got, off_t(got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += size_t(r);
        }
        ::close(fd);
        FM_IO(got == size, "cannot read '", path, "'");
        base = data.data();
    }
    auto unmap = [&] { if (use_mmap) ::munmap(base, size); };
    uint32_t version;
    uint64_t len, sum;
    std::memcpy(&version, base + 8, 4);
    std::memcpy(&len, base + 16, 8);
    std::memcpy(&sum, base + 24, 8);
    std::string why;
    if (std::memcmp(base, kMagic, 8) != 0) why = "not a memory bank (bad magic)";
    else if (version != kVersion) why = "unsupported version " + std::to_string(version);
    else if (len != size - kPreamble) why = "truncated or padded: header says " + std::to_string(len) +
                                            " payload bytes, file has " + std::to_string(size - kPreamble);
    else if (checksum64(base + kPreamble, len) != sum) why = "checksum mismatch (corrupted)";
    if (!why.empty()) {
        unmap();
        FM_ARG(false, path, ": ", why);
    }
    Reader r(base + kPreamble, len, path);
    try {
        const uint32_t dim = r.get<uint32_t>("dim"), metric = r.get<uint32_t>("metric");
        if (dim == 0 || dim > uint32_t(kMaxDim) || metric > 2) r.fail("bad dim or metric");
        std::unique_ptr<MemoryBank> bank(new MemoryBank(int(dim), Metric(metric)));
        bank->parse(r, base + kPreamble, use_mmap);
        if (use_mmap) bank->mapping_ = base, bank->mapping_size_ = size;
        return bank;
    } catch (...) {
        unmap();
        throw;
    }
}

void MemoryBank::parse(Reader& r, uint8_t* payload, bool borrow_keys) {
    const std::string index = r.str("index name");
    if (index != "flat" && index != "lsh" && index != "ivf" && index != "hnsw") r.fail("unknown index " + index);
    next_id_ = r.get<int64_t>("next id");
    auto ids = r.vec<int64_t>("slot ids");
    auto live = r.vec<uint8_t>("live flags");
    if (live.size() != ids.size()) r.fail("slot arrays disagree");
    r.align(64);
    const size_t key_bytes = ids.size() * dim() * sizeof(float);
    const size_t key_off = r.offset();
    r.bytes(key_bytes, "keys");
    float* keys = reinterpret_cast<float*>(payload + key_off);
    if (borrow_keys) store_.restore_borrowed(ids, live, keys);
    else store_.restore(ids, live, keys);
    entries_.assign(ids.size(), Entry{});
    for (uint32_t s = 0; s < ids.size(); ++s) {
        if (!live[s]) continue;
        if (ids[s] < 0 || ids[s] >= next_id_ || !slot_.emplace(ids[s], s).second) r.fail("bad or repeated id");
        Entry& e = entries_[s];
        const uint32_t dt = r.get<uint32_t>("value dtype");
        if (dt > 2) r.fail("bad value dtype");
        e.value_dtype = DType(dt);
        e.n_slots = r.get<int32_t>("value slots");
        e.d_value = r.get<int32_t>("value width");
        e.value = r.vec<uint8_t>("value");
        e.text = r.str("text");
        e.metadata = r.str("metadata");
        e.created = r.get<double>("created");
        e.updated = r.get<double>("updated");
        check_entry(e, "entry " + std::to_string(ids[s]));
    }
    index_ = make_index(index, store_, {});
    index_->load(r);
    if (r.remaining() != 0) r.fail(std::to_string(r.remaining()) + " unexpected trailing bytes");
}

}  // namespace fm::memory
