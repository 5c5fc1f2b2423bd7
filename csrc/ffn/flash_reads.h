// Read planning for flash streaming: which blocks of the FFN file to read for a layer's missing
// neurons, how to coalesce them into requests, and where each neuron lands. Apart from the
// compute (sparse_ffn.cpp), which reads a round, computes with it and plans the next.
//
// Each neuron's pieces (bundled: one, the whole bundle; unbundled: its gate row, up row and down
// column) become ranges of 4096-byte blocks. A piece joins the previous request of the same piece
// when the gap between them is at most `coalesce_gap` bundles and the request stays within
// `max_request` bytes: a gap bundle costs 4 KiB of bandwidth, less than another request. The
// staging buffer holds one region per piece; a round is full when a neuron's blocks no longer fit
// or `staging_rows` neurons are planned.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "io/direct_reader.h"

namespace fm {

// Where neuron i of a layer lies in the file: `n_pieces` byte ranges (bundled: one, the whole
// bundle; unbundled: its gate row, up row and down column, from three matrices). Piece p of
// neuron i is at piece_base[layer][p] + i * piece_stride[p], piece_bytes[p] long, and the pieces
// concatenated in order give the bundle [gate | up | down].
struct FileLayout {
    static constexpr int kMaxPieces = 3;
    std::string path;
    std::vector<std::vector<uint64_t>> piece_base;  // (n_layers, n_pieces)
    std::vector<uint64_t> piece_stride, piece_bytes;  // (n_pieces)

    int n_pieces() const { return int(piece_bytes.size()); }
    // 1 to kMaxPieces pieces that add up to a bundle of `bundle_bytes`, each within its stride,
    // a base per layer and piece; else an exception naming the field. (The file's size is
    // checked when it is opened.)
    void validate(int n_layers, uint64_t bundle_bytes) const;
};

class FlashReads {
  public:
    // Allocates the staging buffer (and, unbundled, the rows pieces are assembled into).
    // staging_bytes (0: no cap) caps the staging buffer below what staging_rows scattered neurons
    // could need (neighbours share blocks: a packed layer of small bundles reads in few blocks).
    void init(const FileLayout& layout, size_t bundle_bytes, int staging_rows, size_t staging_bytes, int coalesce_gap,
              size_t max_request);
    // Bytes init() allocates for `staging_rows` neurons of `layout` (within staging_bytes).
    static size_t bytes_for(const FileLayout& layout, size_t bundle_bytes, int staging_rows, size_t staging_bytes = 0);
    size_t bytes() const { return staging_.size() + assembled_.size(); }

    // Plans the read of `neuron` of `layer` in this round; false when the round is full (read it,
    // clear(), and plan again).
    bool plan(int layer, int neuron);
    int planned() const { return planned_; }
    // Whether to end the round before n more neurons: once it holds some, they might not fit
    // wherever they lie (each piece's blocks, and a coalescing gap before it), though an empty
    // buffer would hold them. Rounds then end on groups of list positions (sparse_ffn.cpp); where
    // even an empty buffer might not hold a group, they end where they fill.
    bool full_before(int n) const;
    // The round's requests, in piece order, each run of blocks one request.
    const std::vector<ReadRequest>& requests();
    // Once the round is read: the bundle [gate | up | down] of the j-th planned neuron, where it
    // lies in the staging buffer (bundled) or assembled from its pieces (unbundled).
    const void* bundle(int j);
    void clear();  // starts a new round

  private:
    struct Run {
        uint64_t b0, b1;  // blocks [b0, b1) of the file
        char* dst;
    };
    FileLayout layout_;
    size_t bundle_bytes_ = 0;
    int staging_rows_ = 0, coalesce_gap_ = 0;
    size_t max_request_ = 0;
    Buffer staging_;              // one region per piece, 4096-aligned
    Buffer assembled_;            // (staging_rows, bundle_bytes) bundles assembled from pieces (unbundled)
    char* region_[FileLayout::kMaxPieces] = {};
    size_t region_blocks_[FileLayout::kMaxPieces] = {};  // staging blocks per piece
    std::vector<Run> runs_[FileLayout::kMaxPieces];
    size_t used_[FileLayout::kMaxPieces] = {};          // staging blocks used per piece
    std::vector<char*> landed_;   // (planned, n_pieces) where each piece of each planned neuron lands
    std::vector<ReadRequest> requests_;
    int planned_ = 0;
};

}  // namespace fm
