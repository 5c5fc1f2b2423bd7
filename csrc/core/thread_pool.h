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
//
// Fewer threads on a busy machine. When other processes want the cores, more threads than the
// cores left make the OS share them out: the caller is descheduled in the middle of its steps,
// and a thread descheduled while it holds a chunk holds the step until it runs again
// (milliseconds, against tens of microseconds of work). Over each window of kWindowNs the caller
// sums how long the active threads waited on the OS's run queue (Linux's schedstat) and how long
// it waited, out of work, for the others: when the first is a sixth of the window, or the second a
// sixth of the time in jobs, the threads above half the active count park (they leave their cores
// to the other work) for a while, then all are tried again; the time reduced doubles, up to
// kReducedMaxNs, while the waits come back. Results do not change: run()'s shares are the same
// whoever runs them, and parallel_dynamic's chunks write disjoint outputs (the caller alone takes
// [0, n) at once).
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
    uint64_t reduced_jobs() const { return reduced_jobs_; }  // jobs run with fewer than size() threads

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
        if (n_ == 1 || n_chunks == 1 || alone()) {
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
    static constexpr int64_t kWindowNs = 20'000'000;       // the time over which waits are summed
    static constexpr int64_t kReducedMinNs = 50'000'000;   // the first time with fewer threads
    static constexpr int64_t kReducedMaxNs = 800'000'000;  // the most, while stalls persist

  private:
    // A job: job(ctx, chunk, tid) for each of its n_chunks chunks.
    using Job = void (*)(const void*, size_t, size_t);
    void dispatch(Job job, const void* ctx, size_t n_chunks);
    // Whether the caller runs the next job by itself, the pool being reduced to it (ends a
    // reduction whose time is up).
    bool alone();
    void help(int tid);  // runs chunks of the current job while any is left to take
    void worker(int tid);
    void account(int64_t now, int64_t job_ns, int64_t stalled_ns);  // may reduce the active threads
    void start_window(int64_t now);
    int64_t threads_waited_ns();  // the active threads' run-queue waits, summed; -1: not known
    void set_active(int n);
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
    // threads [0, active_) take chunks; the others wait on park_cv_ (set by the caller, under mu_)
    std::atomic<int> active_;
    std::condition_variable park_cv_;
    std::vector<std::atomic<int64_t>> tids_;  // each thread's OS id (0 until it has started)
    // the caller's own: the current window (its start, the active threads' run-queue waits then
    // (-1: not known), which thread the caller was, time in jobs and stalled since), and until when
    // the threads stay reduced
    int64_t window_start_ = 0, window_waited_ = -1, window_caller_ = 0, job_ns_ = 0, stalled_ns_ = 0;
    int64_t reduced_until_ = 0, reduced_for_ns_ = kReducedMinNs;
    uint64_t reduced_jobs_ = 0;
};

}  // namespace fm
