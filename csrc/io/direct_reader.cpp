#include "io/direct_reader.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include "core/error.h"
#include "io/file.h"

namespace fm {

DirectReader::DirectReader(const std::string& path, int queue_depth, bool direct) : path_(path) {
    FM_ARG(queue_depth >= 1 && queue_depth <= 256, "queue_depth must lie in [1, 256], got ", queue_depth);
    fd_ = open_read(path, &size_, direct, &direct_);
    try {
        for (int i = 1; i < queue_depth; ++i) threads_.emplace_back([this] { worker(); });
    } catch (const std::system_error& e) {  // no thread to be had (a thread or address-space limit)
        stop();  // the threads started must be joined: a joinable std::thread destroyed aborts
        throw std::runtime_error("cannot start the I/O threads reading '" + path + "' (queue_depth " +
                                 std::to_string(queue_depth) + "): " + e.what());
    }
}

DirectReader::~DirectReader() { stop(); }

void DirectReader::stop() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    ::close(fd_);
}

void DirectReader::worker() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
        wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        const std::vector<ReadRequest>* batch = batch_;
        if (!batch) continue;  // woke after the caller finished this batch alone
        ++active_;
        lk.unlock();
        serve(*batch);
        lk.lock();
        if (--active_ == 0) finished_.notify_all();
    }
}

void DirectReader::serve(const std::vector<ReadRequest>& reqs) {
    for (size_t i; (i = next_.fetch_add(1)) < reqs.size();) {
        const ReadRequest& r = reqs[i];
        char* p = static_cast<char*>(r.dst);
        uint64_t off = r.offset;
        size_t n = r.bytes;
        std::string err;
        while (n > 0) {
            ssize_t got = ::pread(fd_, p, n, off_t(off));
            if (got < 0 && errno == EINTR) continue;
            if (got == 0 && off >= size_) {  // the last block of a file that ends mid-block
                std::memset(p, 0, n);
                break;
            }
            if (got <= 0) {
                err = "read error in '" + path_ + "' at byte " + std::to_string(off) + ": " +
                      (got == 0 ? "unexpected end of file (was it truncated?)" : std::strerror(errno));
                break;
            }
            p += got, n -= size_t(got), off += uint64_t(got);
        }
        if (!err.empty()) {
            std::lock_guard<std::mutex> lk(mu_);
            if (error_.empty()) error_ = err;
        }
        if (done_.fetch_add(1) + 1 == reqs.size())
            ended_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
    }
}

void DirectReader::start(const std::vector<ReadRequest>& reqs) {
    FM_ARG(!submitted_, "DirectReader of '", path_, "': a batch is still in flight (wait() for it first)");
    for (const ReadRequest& r : reqs) {
        FM_ARG(r.offset % kIoAlign == 0 && r.bytes % kIoAlign == 0 && uintptr_t(r.dst) % kIoAlign == 0 && r.bytes,
               "direct read of '", path_, "' is not aligned to ", kIoAlign, " bytes (offset ", r.offset,
               ", bytes ", r.bytes, ")");
        // an aligned read may pass the end of the file by less than a block (the bytes wanted lie before it)
        FM_IO(r.offset + r.bytes < size_ + kIoAlign, "'", path_, "' is truncated: a read needs bytes [", r.offset,
              ", ", r.offset + r.bytes - kIoAlign, ") at least, but the file has ", size_, " bytes");
    }
    started_ = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lk(mu_);
    batch_ = &reqs;
    next_ = 0;
    done_ = 0;
    error_.clear();
    ++generation_;
}

void DirectReader::finish(const std::vector<ReadRequest>& reqs, std::chrono::steady_clock::time_point waited_from) {
    std::string err;
    {
        std::unique_lock<std::mutex> lk(mu_);
        // every request is done and no worker still holds the batch
        finished_.wait(lk, [&] { return done_.load() == reqs.size() && active_ == 0; });
        batch_ = nullptr;
        err.swap(error_);
    }
    const auto ended = std::chrono::steady_clock::time_point(std::chrono::steady_clock::duration(ended_ns_.load()));
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - waited_from).count();
    stats_.busy_seconds += std::chrono::duration<double>(std::max(ended, started_) - started_).count();
    stats_.requests += reqs.size();
    stats_.batches += 1;
    for (const ReadRequest& r : reqs) stats_.bytes += r.bytes;
    FM_IO(err.empty(), err);
}

void DirectReader::read(const std::vector<ReadRequest>& reqs) {
    if (reqs.empty()) return;
    start(reqs);
    if (reqs.size() > 1) wake_.notify_all();
    serve(reqs);  // the caller reads too
    finish(reqs, started_);
}

void DirectReader::submit(const std::vector<ReadRequest>& reqs) {
    start(reqs);
    submitted_ = &reqs;
    if (threads_.empty()) serve(reqs);  // no I/O thread: read now
    else wake_.notify_all();
}

void DirectReader::wait() {
    FM_ARG(submitted_, "DirectReader of '", path_, "': wait() without a batch submitted");
    const std::vector<ReadRequest>& reqs = *submitted_;
    submitted_ = nullptr;
    finish(reqs, std::chrono::steady_clock::now());
}

}  // namespace fm
