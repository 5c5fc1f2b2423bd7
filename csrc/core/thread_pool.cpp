#include "core/thread_pool.h"

#include <stdexcept>
#include <string>
#include <system_error>

#include "core/error.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace fm {

namespace {
constexpr int kSpinsBeforeSleep = 1 << 15;  // about a millisecond of pause instructions
constexpr int kSpinsBeforeYield = 256;      // then the core is offered to others between spins

// Spins until done(): pause instructions, and every kSpinsBeforeYield of them a yield of the core
// (on a busy machine the thread that has the work left may be waiting for it).
template <typename Done>
void wait_until(Done done) {
    for (int i = 1; !done(); ++i) {
        if (i % kSpinsBeforeYield) cpu_relax();
        else std::this_thread::yield();
    }
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads) {
    try {
        for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
    } catch (const std::system_error& e) {  // no thread to be had (a thread or address-space limit)
        stop();  // the threads started must be joined: a joinable std::thread destroyed aborts
        throw std::runtime_error("cannot start " + std::to_string(n_) + " threads: " + e.what());
    }
}

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::stop() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
        generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& th : threads_) th.join();
    threads_.clear();
}

void ThreadPool::dispatch(Job job, const void* ctx, size_t n_chunks) {
    if (n_ == 1) {
        for (size_t c = 0; c < n_chunks; ++c) job(ctx, c, 0);
        return;
    }
    FM_ARG(n_chunks < (size_t(1) << 32), "thread pool: ", n_chunks, " chunks in one job");
    job_ = job;
    ctx_ = ctx;
    chunks_done_.store(0, std::memory_order_relaxed);
    claim_.store(uint64_t(n_chunks) << 32, std::memory_order_release);
    bool wake;
    {
        std::lock_guard<std::mutex> lk(mu_);
        generation_.fetch_add(1, std::memory_order_release);
        wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    help(0);
    wait_until([&] { return chunks_done_.load(std::memory_order_acquire) == n_chunks; });
}

void ThreadPool::help(int tid) {
    uint64_t w = claim_.load(std::memory_order_acquire);
    while ((w & 0xffffffffu) < (w >> 32)) {
        if (!claim_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        job_(ctx_, size_t(w & 0xffffffffu), size_t(tid));
        chunks_done_.fetch_add(1, std::memory_order_release);
        w = claim_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker(int tid) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = generation_.load(std::memory_order_acquire)) == seen) {
            if (++spins < kSpinsBeforeSleep) {
                if (spins % kSpinsBeforeYield) cpu_relax();
                else std::this_thread::yield();
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
        help(tid);
    }
}

}  // namespace fm
