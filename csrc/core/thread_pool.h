// A fixed pool of threads (the caller is thread 0) that runs one job at a time: pieces of work
// that every thread, the caller included, takes from a shared counter until none is left. A
// thread that the OS has descheduled (another process wants the core) delays only the piece it
// holds, and a thread that wakes late finds the work done. Two ways to cut a job:
// - run(f): f(share, n_threads) once for each share in [0, n_threads). For work whose result
//   depends on how it is split (per-share accumulators summed in a fixed order): the split is
//   fixed, only which thread runs a share varies, so results are the same run to run.
// - parallel_dynamic(n, align, f): [0, n) cut into about kChunksPerThread chunks per thread,
//   for work whose chunks write disjoint outputs.
// Decode dispatches a few hundred parallel regions per token, so idle threads spin briefly before
// sleeping on a condition variable (a wake-up through the kernel costs tens of microseconds, a
// spin hand-off well under one); spinning threads yield their core every few hundred pauses, so
// that on a busy machine a thread with work runs instead.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
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

    // Calls f(share, n_threads) once for each share in [0, n_threads), each taken by whichever
    // thread is free (share 0 first by the caller), and returns when all have finished.
    template <typename F>
    void run(F&& f) {
        struct Ctx {
            F* f;
            int n;
        } ctx{&f, n_};
        auto trampoline = [](const void* c, size_t share, size_t) {
            const Ctx& x = *static_cast<const Ctx*>(c);
            (*x.f)(int(share), x.n);
        };
        dispatch(trampoline, &ctx, size_t(n_));
    }

    // Splits [0, n) into contiguous chunks, one per thread, chunk edges rounded to `align`.
    template <typename F>
    void parallel_for(size_t n, size_t align, F&& f) {
        run([&](int tid, int nt) {
            auto [b, e] = chunk(n, tid, nt, align);
            if (b < e) f(b, e, tid);
        });
    }

    // f(b, e, tid) over chunks of [0, n) (edges multiples of `align`, about kChunksPerThread per
    // thread), each taken by whichever thread is free; tid is the thread running it (its scratch).
    template <typename F>
    void parallel_dynamic(size_t n, size_t align, F&& f) {
        if (n == 0) return;
        const size_t units = (n + align - 1) / align;
        const size_t per = (units + size_t(n_) * kChunksPerThread - 1) / (size_t(n_) * kChunksPerThread);
        const size_t step = per * align, n_chunks = (n + step - 1) / step;
        if (n_ == 1 || n_chunks == 1) {
            f(size_t(0), n, 0);
            return;
        }
        struct Ctx {
            F* f;
            size_t n, step;
        } ctx{&f, n, step};
        auto trampoline = [](const void* c, size_t chunk, size_t tid) {
            const Ctx& x = *static_cast<const Ctx*>(c);
            const size_t b = chunk * x.step, e = b + x.step < x.n ? b + x.step : x.n;
            (*x.f)(b, e, int(tid));
        };
        dispatch(trampoline, &ctx, n_chunks);
    }

    static std::pair<size_t, size_t> chunk(size_t n, int tid, int nt, size_t align) {
        size_t units = (n + align - 1) / align;
        size_t b = units * tid / nt * align, e = units * (tid + 1) / nt * align;
        return {b < n ? b : n, e < n ? e : n};
    }

    static constexpr size_t kChunksPerThread = 4;

  private:
    // A job: job(ctx, chunk, tid) for each of its n_chunks chunks.
    using Job = void (*)(const void*, size_t, size_t);
    void dispatch(Job job, const void* ctx, size_t n_chunks);
    void help(int tid);  // runs chunks of the current job while any is left to take
    void worker(int tid);
    void stop();  // joins the threads (the destructor; a constructor that fails)

    int n_;
    std::vector<std::thread> threads_;
    Job job_ = nullptr;
    const void* ctx_ = nullptr;
    std::atomic<uint64_t> generation_{0};  // bumped per job: workers wake for a new value
    // the job's chunk count (high 32 bits) and the next chunk to take (low 32)
    // in one word. A thread takes a chunk with a compare-exchange and only then reads job_ and
    // ctx_: the job cannot end (nor be replaced) while a chunk of it is taken and not done, so a
    // late thread takes a chunk of the job that is current, or none.
    std::atomic<uint64_t> claim_{0};
    std::atomic<size_t> chunks_done_{0};
    std::atomic<bool> stop_{false};
    std::mutex mu_;
    std::condition_variable cv_;
    int sleepers_ = 0;
};

}  // namespace fm
