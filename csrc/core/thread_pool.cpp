#include "core/thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace fm {

namespace {
constexpr int kSpinsBeforeSleep = 1 << 15;  // about a millisecond of pause instructions
}

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads) {
    for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
        generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& th : threads_) th.join();
}

void ThreadPool::dispatch(Job job, const void* ctx) {
    if (n_ == 1) {
        job(ctx, 0, 1);
        return;
    }
    job_ = job;
    ctx_ = ctx;
    pending_.store(n_ - 1, std::memory_order_relaxed);
    bool wake;
    {
        std::lock_guard<std::mutex> lk(mu_);
        generation_.fetch_add(1, std::memory_order_release);
        wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    job(ctx, 0, n_);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
}

void ThreadPool::worker(int tid) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = generation_.load(std::memory_order_acquire)) == seen) {
            if (++spins < kSpinsBeforeSleep) {
                cpu_relax();
                continue;
            }
            std::unique_lock<std::mutex> lk(mu_);
            ++sleepers_;
            cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            --sleepers_;
            spins = 0;
        }
        seen = g;
        if (stop_.load(std::memory_order_acquire)) return;
        job_(ctx_, tid, n_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

}  // namespace fm
