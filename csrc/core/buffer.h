// Owned, 64-byte aligned (4096 for I/O buffers) storage. Every byte the engine owns lives in
// one of these, so the total it holds can be accounted (the DRAM budget builds on this).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>

#include <sys/mman.h>

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

    // Weights (allocate with huge = true) of kHugeMin bytes or more are laid out in whole 2 MiB
    // pages and asked to be backed by huge pages (MADV_HUGEPAGE; Linux's transparent huge pages in
    // "madvise" mode): a decode step's pass over them then takes one TLB entry per 2 MiB, not per
    // 4 KiB (Gemma 3's 178 MB embedding table, its LM head: 13 -> 10.6 ms per token). The rounding
    // is counted in size(); footprint() says what an allocation will take.
    static constexpr size_t kHugePage = size_t(2) << 20, kHugeMin = size_t(16) << 20;

    static size_t footprint(size_t bytes, size_t align = 64, bool huge = false) {
        if (huge && bytes >= kHugeMin && align < kHugePage) align = kHugePage;
        return (bytes + align - 1) / align * align;
    }

    void allocate(size_t bytes, size_t align = 64, bool huge = false) {
        release();
        if (bytes == 0) return;
        huge = huge && bytes >= kHugeMin;
        if (huge && align < kHugePage) align = kHugePage;
        size_t rounded = footprint(bytes, align);
        ptr_ = std::aligned_alloc(align, rounded);
        FM_ARG(ptr_ != nullptr, "cannot allocate ", bytes, " bytes");
        if (huge) madvise(ptr_, rounded, MADV_HUGEPAGE);  // a hint: without it, 4 KiB pages
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
