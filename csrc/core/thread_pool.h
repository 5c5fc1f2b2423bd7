// A fixed pool of threads that run one job at a time, all threads together (the caller is
// thread 0). Decode dispatches a few hundred parallel regions per token, so idle workers spin
// briefly before sleeping on a condition variable: a wake-up through the kernel costs tens of
// microseconds, a spin hand-off well under one.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace fm {

class ThreadPool {
  public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_; }

    // Calls f(tid, n_threads) once on every thread and returns when all have finished.
    template <typename F>
    void run(F&& f) {
        auto trampoline = [](const void* ctx, int tid, int n) { (*static_cast<const F*>(ctx))(tid, n); };
        dispatch(trampoline, &f);
    }

    // Splits [0, n) into contiguous chunks, one per thread, chunk edges rounded to `align`.
    template <typename F>
    void parallel_for(size_t n, size_t align, F&& f) {
        run([&](int tid, int nt) {
            auto [b, e] = chunk(n, tid, nt, align);
            if (b < e) f(b, e, tid);
        });
    }

    static std::pair<size_t, size_t> chunk(size_t n, int tid, int nt, size_t align) {
        size_t units = (n + align - 1) / align;
        size_t b = units * tid / nt * align, e = units * (tid + 1) / nt * align;
        return {b < n ? b : n, e < n ? e : n};
    }

  private:
    using Job = void (*)(const void*, int, int);
    void dispatch(Job job, const void* ctx);
    void worker(int tid);

    int n_;
    std::vector<std::thread> threads_;
    Job job_ = nullptr;
    const void* ctx_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    std::mutex mu_;
    std::condition_variable cv_;
    int sleepers_ = 0;
};

}  // namespace fm
