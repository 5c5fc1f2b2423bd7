// Parallel positional reads that bypass the page cache (O_DIRECT), for streaming FFN neuron
// bundles from flash. Reads are submitted as one batch and served by a pool of I/O threads that
// block in pread (the caller serves requests too), so a batch keeps `queue_depth` requests in
// flight. Where the filesystem refuses O_DIRECT the file is opened buffered instead and
// `direct()` says so (the Python layer warns), so the DRAM figure is honest or flagged.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fm {

struct ReadRequest {
    uint64_t offset;  // multiple of kIoAlign
    size_t bytes;     // multiple of kIoAlign
    void* dst;        // aligned to kIoAlign
};

struct IoStats {
    uint64_t bytes = 0;
    uint64_t requests = 0;
    uint64_t batches = 0;
    double seconds = 0;  // wall time the caller waited: in read(), and in wait() after submit()
    double busy_seconds = 0;  // wall time from each batch's start to its last request's end
};

constexpr size_t kIoAlign = 4096;

class DirectReader {
  public:
    DirectReader(const std::string& path, int queue_depth, bool direct = true);
    ~DirectReader();
    DirectReader(const DirectReader&) = delete;
    DirectReader& operator=(const DirectReader&) = delete;

    bool direct() const { return direct_; }
    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }
    int queue_depth() const { return int(threads_.size()) + 1; }

    // Reads every request, in parallel; returns when all are done. Throws std::runtime_error
    // naming the file and offset on a read error or a short file (after every request finished,
    // so no thread still writes into the caller's buffers).
    void read(const std::vector<ReadRequest>& reqs);
    // The same in two halves, so that the caller computes while the I/O threads read: submit()
    // returns at once (with queue_depth 1, no I/O thread, it reads first); wait() returns when every
    // request is done and throws as read() does. reqs and their buffers must stay until wait().
    // One batch at a time.
    void submit(const std::vector<ReadRequest>& reqs);
    void wait();
    bool busy() const { return submitted_ != nullptr; }
    const IoStats& stats() const { return stats_; }
    void reset_stats() { stats_ = IoStats{}; }

  private:
    void stop();  // joins the threads and closes the file (the destructor; a constructor that fails)
    void worker();
    void serve(const std::vector<ReadRequest>& reqs);  // takes requests of the batch until none are left
    void start(const std::vector<ReadRequest>& reqs);  // checks the batch and hands it to the I/O threads
    // waits for it (the caller waiting since waited_from); stats; throws its first error
    void finish(const std::vector<ReadRequest>& reqs, std::chrono::steady_clock::time_point waited_from);

    std::string path_;
    int fd_ = -1;
    bool direct_ = true;
    uint64_t size_ = 0;
    IoStats stats_;

    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable wake_, finished_;
    const std::vector<ReadRequest>* batch_ = nullptr;
    uint64_t generation_ = 0;
    int active_ = 0;  // workers inside serve()
    bool stop_ = false;
    std::atomic<size_t> next_{0};
    std::atomic<size_t> done_{0};
    std::string error_;  // first error of the batch
    const std::vector<ReadRequest>* submitted_ = nullptr;  // the batch submit() started
    std::chrono::steady_clock::time_point started_;
    std::atomic<int64_t> ended_ns_{0};  // when the batch's last request ended (steady_clock)
};

}  // namespace fm
