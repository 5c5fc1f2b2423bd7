// Weights read from the model file when a token needs them instead of held in DRAM
// (load(offload="all")): a layer's attention matrices before its projections, the LM head a
// chunk of rows at a time, the embedding rows a token gathers. Direct I/O (io/direct_reader.h)
// into one staging buffer, which the DRAM budget counts; the tensors lie anywhere in the file,
// and a read covers the 4096-byte blocks a range spans.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "io/direct_reader.h"

namespace fm {

class WeightStream {
  public:
    WeightStream(const std::string& path, size_t staging_bytes, int queue_depth, bool direct);

    const std::string& path() const { return reader_.path(); }
    uint64_t file_size() const { return reader_.size(); }
    size_t bytes() const { return staging_.size(); }
    const IoStats& stats() const { return reader_.stats(); }
    // Bytes of staging that ranges of these sizes take (each padded to the blocks it may span).
    static size_t staging_for(const std::vector<size_t>& sizes);

    // Reads the n byte ranges [offsets[i], offsets[i] + sizes[i]) of the file, all in one batch,
    // into the staging buffer; out[i] points at range i there, valid until the next fetch.
    // Throws when they do not fit the staging buffer (naming `what`) or on a read error.
    void fetch(const uint64_t* offsets, const size_t* sizes, int n, const char** out, const char* what);

  private:
    DirectReader reader_;
    Buffer staging_;
    std::vector<ReadRequest> requests_;
};

}  // namespace fm
