// Weights read from the model file when a token needs them instead of held in DRAM
// (load(offload="all")): a layer's attention matrices before its projections, the LM head a
// chunk of rows at a time, the embedding rows a token gathers. Direct I/O (io/direct_reader.h)
// into one staging buffer, which the DRAM budget counts; the tensors lie anywhere in the file,
// and a read covers the 4096-byte blocks a range spans. The next layer's attention matrices are
// read ahead (prefetch) while this layer's FFN computes: a later fetch of ranges among them
// waits for that batch instead of reading.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "io/direct_reader.h"

namespace fm {

class WeightStream {
  public:
    WeightStream(const std::string& path, size_t staging_bytes, int queue_depth, bool direct);
    ~WeightStream();
    WeightStream(const WeightStream&) = delete;
    WeightStream& operator=(const WeightStream&) = delete;

    const std::string& path() const { return reader_.path(); }
    uint64_t file_size() const { return reader_.size(); }
    size_t bytes() const { return staging_.size(); }
    const IoStats& stats() const { return reader_.stats(); }
    void reset_stats() { reader_.reset_stats(); }
    // Bytes of staging that ranges of these sizes take (each padded to the blocks it may span).
    static size_t staging_for(const std::vector<size_t>& sizes);

    // Reads the n byte ranges [offsets[i], offsets[i] + sizes[i]) of the file, all in one batch,
    // into the staging buffer; out[i] points at range i there, valid until the next fetch.
    // Throws when they do not fit the staging buffer (naming `what`) or on a read error.
    // A fetch of ranges that all lie in the batch read ahead returns pointers into it (waiting for
    // it if it is still in flight) and reads nothing; the batch stays for later fetches among it.
    void fetch(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what);
    // Starts reading the n ranges into the staging buffer and returns at once (DirectReader::submit);
    // does nothing where they do not fit in it together.
    // What earlier fetches returned is invalid from here on. A read error surfaces in the fetch that
    // waits for the batch; a fetch of other ranges, or the next prefetch, drops the batch and its
    // error with it (those ranges are read again when fetched).
    void prefetch(const uint64_t* offsets, const size_t* sizes, int n, const char* what);
    int64_t prefetch_hits() const { return hits_; }  // fetches the batch read ahead served

    // Reads the bytes [offset, offset + total) of the file `chunk` bytes at a time and calls
    // use(at, bytes, data) on each chunk in order (at: its first byte's index in the range). Where
    // two chunks fit in the staging buffer, the next is read while `use` computes with this one.
    // Throws naming `what` on a read error, with no read left in flight.
    using ChunkUse = std::function<void(size_t at, size_t bytes, const char* data)>;
    void stream(uint64_t offset, size_t total, size_t chunk, const ChunkUse& use, const char* what);
    // The largest chunk stream() reads while computing with another (0: none fits twice).
    size_t double_buffered_chunk() const;

  private:
    struct Range {
        uint64_t offset;
        size_t size;
        const char* data;
    };
    // Plans the ranges into `reqs` over the `room` bytes of staging at `base` (requests_ over the
    // whole buffer unless given); out[i]: where range i will be.
    void plan(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what);
    void plan(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what, char* base,
              size_t room, std::vector<ReadRequest>& reqs);
    void drop_ahead();  // waits for a batch still in flight (its errors dropped) and forgets it
    size_t half() const;  // bytes of each half of the staging buffer (block-aligned), for stream()

    DirectReader reader_;
    Buffer staging_;
    std::vector<ReadRequest> requests_;
    std::vector<ReadRequest> chunk_requests_[2];  // stream(): the chunk in flight and the one computed
    std::vector<Range> ahead_;  // the ranges read ahead (empty: none)
    bool in_flight_ = false;    // a batch (ahead_'s, or stream()'s next chunk) was submitted and not waited for
    int64_t hits_ = 0;
};

}  // namespace fm
