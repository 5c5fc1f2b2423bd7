#include "core/thread_pool.h"

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <system_error>

#include "core/error.h"

#if defined(__linux__)
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// A wait, out of work, longer than this is a stall: a thread descheduled while it held a chunk (an
// idle pool's last chunk takes at most about as long as the caller's own share).
bool is_stall(int64_t worked_ns, int64_t waited_ns) { return waited_ns > 2 * worked_ns + 20'000; }

// A thread's id, and the total time a thread of this process has waited on a run queue, runnable
// but not running (the second field of its schedstat); -1 where the kernel does not say.
int64_t thread_id() {
#if defined(__linux__)
    return int64_t(syscall(SYS_gettid));
#else
    return 0;
#endif
}

int64_t run_queue_wait_ns(int64_t tid) {
#if defined(__linux__)
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/task/%lld/schedstat", static_cast<long long>(tid));
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[96];
    const ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    unsigned long long run = 0, wait = 0;
    return std::sscanf(buf, "%llu %llu", &run, &wait) == 2 ? int64_t(wait) : -1;
#else
    (void)tid;
    return -1;
#endif
}

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

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads), active_(n_), tids_(size_t(n_)) {
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
    park_cv_.notify_all();
    for (auto& th : threads_) th.join();
    threads_.clear();
}

void ThreadPool::dispatch(Job job, const void* ctx, size_t n_chunks) {
    if (n_ == 1 || alone()) {
        for (size_t c = 0; c < n_chunks; ++c) job(ctx, c, 0);
        return;
    }
    FM_ARG(n_chunks < (size_t(1) << 32), "thread pool: ", n_chunks, " chunks in one job");
    const int64_t t0 = now_ns();
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
    const int64_t t1 = now_ns();
    wait_until([&] { return chunks_done_.load(std::memory_order_acquire) == n_chunks; });
    const int64_t t2 = now_ns();
    account(t2, t2 - t0, is_stall(t1 - t0, t2 - t1) ? t2 - t1 : 0);
}

bool ThreadPool::alone() {
    if (!reduced_until_) return false;
    if (now_ns() >= reduced_until_) {
        reduced_until_ = 0;  // try every thread again, over a new window
        set_active(n_);
        window_start_ = 0;
        return false;
    }
    ++reduced_jobs_;
    return active_.load(std::memory_order_relaxed) == 1;
}

int64_t ThreadPool::threads_waited_ns() {
    tids_[0] = thread_id();  // the caller: whichever thread dispatches
    int64_t sum = 0;
    const int active = active_.load(std::memory_order_relaxed);
    for (int t = 0; t < active; ++t) {
        const int64_t w = tids_[t].load(std::memory_order_relaxed) ? run_queue_wait_ns(tids_[t]) : -1;
        if (w < 0) return -1;
        sum += w;
    }
    return sum;
}

void ThreadPool::start_window(int64_t now) {
    window_start_ = now;
    window_waited_ = threads_waited_ns();
    window_caller_ = tids_[0];
    job_ns_ = stalled_ns_ = 0;
}

void ThreadPool::account(int64_t now, int64_t job_ns, int64_t stalled_ns) {
    if (!window_start_) return start_window(now);
    job_ns_ += job_ns;
    stalled_ns_ += stalled_ns;
    const int64_t span = now - window_start_;
    if (span < kWindowNs) return;
    const int64_t waited_ns = window_waited_ >= 0 && window_caller_ == thread_id() ? threads_waited_ns() : -1;
    const bool waited = waited_ns >= 0 && (waited_ns - window_waited_) * 6 > span;
    const bool stalled = stalled_ns_ * 6 > job_ns_;
    start_window(now);
    if (!waited && !stalled) {
        if (!reduced_until_) reduced_for_ns_ = kReducedMinNs;  // a clean window with every thread
        return;
    }
    const int active = active_.load(std::memory_order_relaxed);
    if (active == 1) return;
    set_active(active / 2);
    reduced_until_ = now + reduced_for_ns_;
    reduced_for_ns_ = reduced_for_ns_ * 2 < kReducedMaxNs ? reduced_for_ns_ * 2 : kReducedMaxNs;
}

void ThreadPool::set_active(int n) {
    {
        std::lock_guard<std::mutex> lk(mu_);
        active_.store(n, std::memory_order_relaxed);
    }
    park_cv_.notify_all();
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
    tids_[tid].store(thread_id(), std::memory_order_relaxed);
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
        if (tid < active_.load(std::memory_order_relaxed)) {
            help(tid);
            continue;
        }
        std::unique_lock<std::mutex> lk(mu_);  // parked until the pool takes every thread again
        park_cv_.wait(lk, [&] { return stop_.load() || tid < active_.load(std::memory_order_relaxed); });
    }
}

}  // namespace fm
