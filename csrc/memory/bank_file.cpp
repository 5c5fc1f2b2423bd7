#include "memory/bank_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "io/file.h"
#include "memory/memory_bank.h"

namespace fm::memory {

namespace {
constexpr char kMagic[8] = {'F', 'M', 'B', 'A', 'N', 'K', 0, 0};
constexpr uint32_t kVersion = 2;  // 1: without the tuning record (still read)
constexpr size_t kPreamble = 64;

// Whether s is UTF-8 (no overlong forms, no surrogates): texts and metadata are Python strs.
bool valid_utf8(const std::string& s) {
    static constexpr uint32_t kMinCode[] = {0, 0, 0x80, 0x800, 0x10000};
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = s[i];
        const int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (len == 0 || i + len > s.size()) return false;
        uint32_t code = len == 1 ? c : c & (0x7F >> len);
        for (int k = 1; k < len; ++k) {
            const unsigned char cc = s[i + k];
            if ((cc & 0xC0) != 0x80) return false;
            code = (code << 6) | (cc & 0x3F);
        }
        if (code < kMinCode[len] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

// A name read from the file, for an error message: quoted, at most 40 bytes, bytes outside
// printable ASCII as \xNN (the message becomes a Python str, which must be UTF-8).
std::string quoted(const std::string& s) {
    std::string out = "'";
    for (size_t i = 0; i < s.size() && i < 40; ++i) {
        const unsigned char c = s[i];
        if (c >= 0x20 && c < 0x7F) {
            out += char(c);
        } else {
            static constexpr char kHex[] = "0123456789abcdef";
            out += std::string("\\x") + kHex[c >> 4] + kHex[c & 15];
        }
    }
    return out + (s.size() > 40 ? "...'" : "'");
}

}  // namespace

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

namespace {

// Removes the temporary files "<path>.tmp-<pid>-<thread>" of saves whose process is gone (killed
// mid-save): each would otherwise stay beside the bank for good.
void remove_abandoned(const std::string& dir, const std::string& name) {
    DIR* d = ::opendir(dir.c_str());
    if (!d) return;
    const std::string prefix = name + ".tmp-";
    while (const dirent* e = ::readdir(d)) {
        const std::string entry = e->d_name;
        if (entry.compare(0, prefix.size(), prefix) != 0) continue;
        const long pid = std::strtol(entry.c_str() + prefix.size(), nullptr, 10);
        if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) ::unlink((dir + entry).c_str());
    }
    ::closedir(d);
}

// Writes the preamble and `payload` to a temporary file beside `path`, fsyncs it, renames it
// over `path` and fsyncs the folder.
void write_atomic(const std::string& path, const std::vector<uint8_t>& payload) {
    uint8_t pre[kPreamble] = {};
    std::memcpy(pre, kMagic, 8);
    const uint64_t len = payload.size(), sum = checksum64(payload.data(), payload.size());
    std::memcpy(pre + 8, &kVersion, 4);
    std::memcpy(pre + 16, &len, 8);
    std::memcpy(pre + 24, &sum, 8);

    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "./" : path.substr(0, slash + 1);
    remove_abandoned(dir, slash == std::string::npos ? path : path.substr(slash + 1));
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
    write_all(payload.data(), payload.size());
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
        ::unlink(tmp.c_str());
        FM_IO(false, "cannot flush '", tmp, "': ", std::strerror(errno));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int e = errno;
        ::unlink(tmp.c_str());
        FM_IO(false, "cannot rename '", tmp, "' to '", path, "': ", std::strerror(e));
    }
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

}  // namespace

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
        w.put<double>(tuning_.target);
        w.put<uint64_t>(tuning_.tuned_at);
        w.put<double>(tuning_.recall);
        w.put<double>(tuning_.us_per_query);
        w.put<double>(tuning_.exact_us_per_query);
        w.put<uint8_t>(tuning_.exact);
        w.put<uint8_t>(tuning_.untrained);
        w.put<uint64_t>(search_params_.size());
        for (const auto& [key, value] : search_params_) {
            w.str(key);
            w.put<double>(value);
        }
    }
    write_atomic(path, w.buf);
}

std::unique_ptr<MemoryBank> MemoryBank::load(const std::string& path, bool use_mmap) {
    // the whole file: mapped privately (the keys are then used where they lie) or read into memory
    FileMapping mapping;
    std::vector<uint8_t> data;
    if (use_mmap) {
        mapping = FileMapping(path);
    } else {
        File file(path);
        data.resize(size_t(file.size()));
        file.read_exact(data.data(), data.size(), 0, "the memory bank");
    }
    uint8_t* base = use_mmap ? mapping.data() : data.data();
    const size_t size = use_mmap ? mapping.size() : data.size();
    FM_ARG(size >= kPreamble, path, ": not a memory bank (", size, " bytes)");
    uint32_t version;
    uint64_t len, sum;
    std::memcpy(&version, base + 8, 4);
    std::memcpy(&len, base + 16, 8);
    std::memcpy(&sum, base + 24, 8);
    std::string why;
    if (std::memcmp(base, kMagic, 8) != 0) why = "not a memory bank (bad magic)";
    else if (version < 1 || version > kVersion)
        why = "unsupported version " + std::to_string(version) + " (this flashmem reads versions 1 to " +
              std::to_string(kVersion) + "; a newer flashmem wrote it?)";
    else if (len != size - kPreamble) why = "truncated or padded: header says " + std::to_string(len) +
                                            " payload bytes, file has " + std::to_string(size - kPreamble);
    else if (checksum64(base + kPreamble, len) != sum) why = "checksum mismatch (corrupted)";
    FM_ARG(why.empty(), path, ": ", why);
    Reader r(base + kPreamble, len, path);
    const uint32_t dim = r.get<uint32_t>("dim"), metric = r.get<uint32_t>("metric");
    if (dim == 0 || dim > uint32_t(kMaxDim) || metric > 2) r.fail("bad dim or metric");
    std::unique_ptr<MemoryBank> bank(new MemoryBank(int(dim), Metric(metric)));
    bank->parse(r, base + kPreamble, use_mmap, version);
    if (use_mmap) bank->mapping_ = std::move(mapping);
    return bank;
}

void MemoryBank::parse(Reader& r, uint8_t* payload, bool borrow_keys, uint32_t version) {
    const std::string index = r.str("index name");
    if (!is_index_name(index)) r.fail("unknown index " + quoted(index));
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
        if (!valid_utf8(e.text) || !valid_utf8(e.metadata))
            r.fail("entry " + std::to_string(ids[s]) + ": its text or metadata is not UTF-8");
        e.created = r.get<double>("created");
        e.updated = r.get<double>("updated");
        e.check("entry " + std::to_string(ids[s]));
    }
    index_ = make_index(index, store_, {});
    index_->load(r);
    tuning_ = Tuning{};
    tuning_.target = default_target(index);  // version 1: tuned at the next add
    if (version >= 2) {
        tuning_.target = r.get<double>("tuning target");
        tuning_.tuned_at = r.get<uint64_t>("tuning size");
        tuning_.recall = r.get<double>("tuned recall");
        tuning_.us_per_query = r.get<double>("tuned time");
        tuning_.exact_us_per_query = r.get<double>("exact time");
        tuning_.exact = r.get<uint8_t>("tuned exact") != 0;
        tuning_.untrained = r.get<uint8_t>("tuned untrained") != 0;
        if (!(tuning_.target >= 0 && tuning_.target <= 1)) r.fail("bad tuning target");
        const uint64_t n_params = r.get<uint64_t>("search settings");
        if (n_params > 16) r.fail("too many search settings");
        for (uint64_t i = 0; i < n_params; ++i) {
            const std::string key = r.str("search setting name");
            const double value = r.get<double>("search setting");
            if (!is_tuned_param(key)) r.fail("unknown search setting " + quoted(key));
            try {
                index_->set_param(key, value);
            } catch (const std::exception& e) {
                r.fail(std::string("bad search setting: ") + e.what());
            }
            search_params_[key] = value;
        }
    }
    if (r.remaining() != 0) r.fail(std::to_string(r.remaining()) + " unexpected trailing bytes");
}

}  // namespace fm::memory
