// Owned, 64-byte aligned (4096 for I/O buffers) storage. Every byte the engine owns lives in
// one of these, so the total it holds can be accounted (the DRAM budget builds on this).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>

#include "core/error.h"

namespace fm {

// Bytes currently held by all Buffers of the process.
inline std::atomic<size_t>& owned_bytes() {
    static std::atomic<size_t> n{0};
    return n;
}

class Buffer {
  public:
    Buffer() = default;
    explicit Buffer(size_t bytes, size_t align = 64) { allocate(bytes, align); }
    ~Buffer() { release(); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    Buffer& operator=(Buffer&& o) noexcept {
        if (this != &o) {
            release();
            ptr_ = std::exchange(o.ptr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }

    void allocate(size_t bytes, size_t align = 64) {
        release();
        if (bytes == 0) return;
        size_t rounded = (bytes + align - 1) / align * align;
        ptr_ = std::aligned_alloc(align, rounded);
        FM_ARG(ptr_ != nullptr, "cannot allocate ", bytes, " bytes");
        size_ = rounded;
        owned_bytes() += size_;
    }
    void release() {
        if (ptr_) {
            std::free(ptr_);
            owned_bytes() -= size_;
        }
        ptr_ = nullptr;
        size_ = 0;
    }

    template <typename T = void>
    T* data() const { return static_cast<T*>(ptr_); }
    size_t size() const { return size_; }

  private:
    void* ptr_ = nullptr;
    size_t size_ = 0;
};

}  // namespace fm
