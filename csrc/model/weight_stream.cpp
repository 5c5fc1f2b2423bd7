#include "model/weight_stream.h"

#include <algorithm>

#include "core/error.h"

namespace fm {

namespace {
// A large range (a chunk of the LM head) is read as pieces of this size, in flight together: one
// 1 MiB pread at a time reads the SSD at a fraction of what it gives to several.
constexpr uint64_t kPiece = uint64_t(128) << 10;
uint64_t block_floor(uint64_t x) { return x / kIoAlign * kIoAlign; }
uint64_t block_ceil(uint64_t x) { return (x + kIoAlign - 1) / kIoAlign * kIoAlign; }
}  // namespace

WeightStream::WeightStream(const std::string& path, size_t staging_bytes, int queue_depth, bool direct)
    : reader_(path, queue_depth, direct) {
    FM_ARG(staging_bytes >= kIoAlign, "weight stream: staging of ", staging_bytes, " bytes is below one block");
    staging_.allocate(block_ceil(staging_bytes), kIoAlign);
}

size_t WeightStream::staging_for(const std::vector<size_t>& sizes) {
    size_t n = 0;
    for (size_t s : sizes) n += block_ceil(s) + kIoAlign;  // a range may start anywhere inside a block
    return n;
}

WeightStream::~WeightStream() { drop_ahead(); }

void WeightStream::drop_ahead() {
    ahead_.clear();
    if (!in_flight_) return;
    in_flight_ = false;
    try {
        reader_.wait();
    } catch (const std::exception&) {  // a batch no one asked for: its error does not matter
    }
}

void WeightStream::prefetch(const uint64_t* offsets, const size_t* sizes, int n, const char* what) {
    drop_ahead();
    size_t need = 0;
    for (int i = 0; i < n; ++i) need += block_ceil(offsets[i] + sizes[i]) - block_floor(offsets[i]);
    if (need > staging_.size()) return;  // a staging buffer sized for less: read when fetched
    std::vector<const char*> out(static_cast<size_t>(n), nullptr);
    plan(offsets, sizes, n, out.data(), what);
    for (int i = 0; i < n; ++i) ahead_.push_back({offsets[i], sizes[i], out[i]});
    reader_.submit(requests_);
    in_flight_ = true;
}

void WeightStream::fetch(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what) {
    bool all = !ahead_.empty();
    for (int i = 0; i < n && all; ++i) {
        all = false;
        for (const Range& r : ahead_)
            if (r.offset == offsets[i] && r.size == sizes[i]) out[i] = r.data, all = true;
    }
    if (all) {
        ++hits_;
        if (in_flight_) {
            in_flight_ = false;
            try {
                reader_.wait();
            } catch (...) {
                ahead_.clear();  // read again by whoever asks next
                throw;
            }
        }
        return;
    }
    drop_ahead();  // the staging buffer is read into again
    plan(offsets, sizes, n, out, what);
    reader_.read(requests_);
}

void WeightStream::plan(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what) {
    plan(offsets, sizes, n, out, what, staging_.data<char>(), staging_.size(), requests_);
}

void WeightStream::plan(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what,
                        char* base, size_t room, std::vector<ReadRequest>& reqs) {
    reqs.clear();
    size_t at = 0;
    for (int i = 0; i < n; ++i) {
        const uint64_t a0 = block_floor(offsets[i]), a1 = block_ceil(offsets[i] + sizes[i]);
        FM_IO(offsets[i] + sizes[i] <= reader_.size(), "'", reader_.path(), "' is truncated: ", what, " needs bytes [",
              offsets[i], ", ", offsets[i] + sizes[i], "), the file has ", reader_.size());
        FM_ARG(at + (a1 - a0) <= room, "weight stream: ", what, " needs ", at + (a1 - a0),
               " bytes of staging, there are ", room);
        char* dst = base + at;
        for (uint64_t p = a0; p < a1; p += kPiece)  // pieces the reader's threads serve in parallel
            reqs.push_back({p, size_t(std::min<uint64_t>(kPiece, a1 - p)), dst + (p - a0)});
        out[i] = dst + (offsets[i] - a0);
        at += a1 - a0;
    }
}

size_t WeightStream::half() const { return staging_.size() / 2 / kIoAlign * kIoAlign; }

size_t WeightStream::double_buffered_chunk() const {
    return half() > kIoAlign ? half() - kIoAlign : 0;  // a chunk may start anywhere inside a block
}

void WeightStream::stream(uint64_t offset, size_t total, size_t chunk, const ChunkUse& use, const char* what) {
    FM_ARG(chunk > 0, "weight stream: ", what, ": chunks of 0 bytes");
    drop_ahead();  // the staging buffer is read into again
    const size_t n = (total + chunk - 1) / chunk;
    const bool two = chunk <= double_buffered_chunk();
    const char* data[2] = {};
    auto submit = [&](size_t k) {  // chunk k, into half k % 2 (the whole buffer with one)
        const uint64_t at = offset + k * chunk;
        const size_t len = std::min(chunk, total - k * chunk);
        const int h = two ? int(k % 2) : 0;
        plan(&at, &len, 1, &data[h], what, staging_.data<char>() + h * half(), two ? half() : staging_.size(),
             chunk_requests_[h]);
        reader_.submit(chunk_requests_[h]);
        in_flight_ = true;
    };
    try {
        if (n) submit(0);
        for (size_t k = 0; k < n; ++k) {
            in_flight_ = false;
            reader_.wait();
            if (two && k + 1 < n) submit(k + 1);
            use(k * chunk, std::min(chunk, total - k * chunk), data[two ? k % 2 : 0]);
            if (!two && k + 1 < n) submit(k + 1);
        }
    } catch (...) {
        drop_ahead();  // no read still lands in the staging buffer
        throw;
    }
}

}  // namespace fm
