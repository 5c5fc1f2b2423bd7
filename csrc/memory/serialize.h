// Little-endian binary writing and bounds-checked reading for memory-bank files. A Reader never
// trusts a count: every length is checked against the bytes that remain before anything is
// allocated, so a hostile or truncated file raises instead of allocating or reading past the end.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace fm::memory {

class Writer {
  public:
    template <typename T>
    void put(const T& v) { append(&v, sizeof(T)); }
    void bytes(const void* p, size_t n) { append(p, n); }
    void str(const std::string& s) { put<uint64_t>(s.size()); bytes(s.data(), s.size()); }
    template <typename T>
    void vec(const std::vector<T>& v) { put<uint64_t>(v.size()); bytes(v.data(), v.size() * sizeof(T)); }
    void align(size_t a) { while (buf.size() % a) buf.push_back(0); }
    std::vector<uint8_t> buf;

  private:
    void append(const void* p, size_t n) {
        const uint8_t* b = static_cast<const uint8_t*>(p);
        buf.insert(buf.end(), b, b + n);
    }
};

class Reader {
  public:
    Reader(const uint8_t* p, size_t n, std::string where) : p_(p), n_(n), where_(std::move(where)) {}
    template <typename T>
    T get(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, p_ + off_, sizeof(T));
        off_ += sizeof(T);
        return v;
    }
    // A count of items of `item_size` bytes each that must still fit in the file.
    uint64_t count(size_t item_size, const char* what) {
        uint64_t n = get<uint64_t>(what);
        FM_ARG(item_size == 0 || n <= remaining() / item_size, where_, ": corrupt or hostile file: ", what,
               " claims ", n, " items but only ", remaining(), " bytes remain");
        return n;
    }
    const uint8_t* bytes(size_t n, const char* what) {
        need(n, what);
        const uint8_t* p = p_ + off_;
        off_ += n;
        return p;
    }
    std::string str(const char* what) {
        uint64_t n = count(1, what);
        return std::string(reinterpret_cast<const char*>(bytes(n, what)), n);
    }
    template <typename T>
    std::vector<T> vec(const char* what) {
        uint64_t n = count(sizeof(T), what);
        std::vector<T> v(n);
        const uint8_t* src = bytes(n * sizeof(T), what);
        if (n) std::memcpy(v.data(), src, n * sizeof(T));  // an empty vector's data() may be null
        return v;
    }
    void align(size_t a) { off_ = (off_ + a - 1) / a * a; FM_ARG(off_ <= n_, where_, ": truncated at alignment"); }
    size_t remaining() const { return n_ - off_; }
    size_t offset() const { return off_; }
    void fail(const std::string& why) const { FM_ARG(false, where_, ": corrupt or hostile file: ", why); }

  private:
    void need(size_t n, const char* what) {
        FM_ARG(n <= n_ - off_, where_, ": truncated or corrupt: ", what, " needs ", n, " bytes at offset ", off_,
               ", ", n_ - off_, " remain");
    }
    const uint8_t* p_;
    size_t n_, off_ = 0;
    std::string where_;
};

}  // namespace fm::memory
