#include "ffn/flash_reads.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace fm {

namespace {
size_t blocks_of(uint64_t bytes) { return (bytes + kIoAlign - 1) / kIoAlign; }

// Staging blocks for one piece of `bytes` of `staging_rows` neurons (each may start anywhere
// inside a block), at most its share of `staging_bytes` (0: no cap), at least one neuron's.
size_t region_blocks(uint64_t bytes, int staging_rows, size_t staging_bytes, uint64_t all_pieces) {
    const size_t one = blocks_of(bytes) + 1, rows = size_t(staging_rows) * one;
    if (!staging_bytes) return rows;
    const size_t cap = size_t(double(staging_bytes) * double(bytes) / double(all_pieces)) / kIoAlign;
    return std::max(one, std::min(rows, cap));
}

uint64_t total_piece_bytes(const FileLayout& layout) {
    uint64_t n = 0;
    for (int p = 0; p < layout.n_pieces(); ++p) n += layout.piece_bytes[p];
    return n;
}
}  // namespace

void FileLayout::validate(int n_layers, uint64_t bundle_bytes) const {
    FM_ARG(!path.empty(), "FileLayout.path: no file named");
    const int np = n_pieces();
    FM_ARG(np >= 1 && np <= kMaxPieces, "FileLayout.piece_bytes: a neuron has 1 to ", kMaxPieces,
           " pieces in the file, got ", np);
    FM_ARG(int(piece_stride.size()) == np, "FileLayout.piece_stride: ", piece_stride.size(), " strides for ", np,
           " pieces");
    uint64_t sum = 0;
    for (int p = 0; p < np; ++p) {
        FM_ARG(piece_bytes[p] > 0, "FileLayout.piece_bytes[", p, "] is 0");
        FM_ARG(piece_stride[p] >= piece_bytes[p], "FileLayout.piece_stride[", p, "] ", piece_stride[p],
               " is shorter than the piece (", piece_bytes[p], " bytes)");
        sum += piece_bytes[p];
    }
    FM_ARG(sum == bundle_bytes, "FileLayout.piece_bytes: a neuron's pieces in '", path, "' take ", sum,
           " bytes, a bundle takes ", bundle_bytes);
    FM_ARG(int(piece_base.size()) == n_layers, "FileLayout.piece_base: ", piece_base.size(), " layers, the model has ",
           n_layers);
    for (int l = 0; l < n_layers; ++l)
        FM_ARG(int(piece_base[l].size()) == np, "FileLayout.piece_base[", l, "]: ", piece_base[l].size(),
               " bases for ", np, " pieces");
}

size_t FlashReads::bytes_for(const FileLayout& layout, size_t bundle_bytes, int staging_rows, size_t staging_bytes) {
    size_t n = 0;
    const uint64_t all = total_piece_bytes(layout);
    for (int p = 0; p < layout.n_pieces(); ++p)
        n += region_blocks(layout.piece_bytes[p], staging_rows, staging_bytes, all) * kIoAlign;
    if (layout.n_pieces() > 1) n += size_t(staging_rows) * bundle_bytes;
    return n;
}

void FlashReads::init(const FileLayout& layout, size_t bundle_bytes, int staging_rows, size_t staging_bytes,
                      int coalesce_gap, size_t max_request) {
    layout_ = layout;
    bundle_bytes_ = bundle_bytes;
    staging_rows_ = staging_rows, coalesce_gap_ = coalesce_gap, max_request_ = max_request;
    size_t blocks = 0;
    const uint64_t all = total_piece_bytes(layout_);
    for (int p = 0; p < layout_.n_pieces(); ++p)
        blocks += region_blocks_[p] = region_blocks(layout_.piece_bytes[p], staging_rows, staging_bytes, all);
    staging_.allocate(blocks * kIoAlign, kIoAlign);
    for (int p = 0, first = 0; p < layout_.n_pieces(); first += int(region_blocks_[p]), ++p)
        region_[p] = staging_.data<char>() + size_t(first) * kIoAlign;
    if (layout_.n_pieces() > 1) assembled_.allocate(size_t(staging_rows) * bundle_bytes);
    landed_.reserve(size_t(staging_rows) * layout_.n_pieces());
    clear();
}

bool FlashReads::plan(int layer, int neuron) {
    const int np = layout_.n_pieces();
    if (planned_ == staging_rows_) return false;
    uint64_t b0[FileLayout::kMaxPieces], b1[FileLayout::kMaxPieces];
    bool extend[FileLayout::kMaxPieces];
    size_t need[FileLayout::kMaxPieces];
    for (int p = 0; p < np; ++p) {  // extend the piece's last run when close enough, else a new run
        const uint64_t a = layout_.piece_base[layer][p] + uint64_t(neuron) * layout_.piece_stride[p];
        b0[p] = a / kIoAlign, b1[p] = blocks_of(a + layout_.piece_bytes[p]);
        const uint64_t gap = coalesce_gap_ * layout_.piece_stride[p] / kIoAlign;
        extend[p] = false;
        if (!runs_[p].empty()) {
            const Run& r = runs_[p].back();
            extend[p] = b0[p] <= r.b1 + gap && (std::max(b1[p], r.b1) - r.b0) * kIoAlign <= max_request_;
        }
        need[p] = extend[p] ? size_t(std::max(b1[p], runs_[p].back().b1) - runs_[p].back().b1) : size_t(b1[p] - b0[p]);
        if (used_[p] + need[p] > region_blocks_[p]) return false;
    }
    for (int p = 0; p < np; ++p) {
        if (!extend[p]) runs_[p].push_back({b0[p], b0[p], region_[p] + used_[p] * kIoAlign});
        Run& r = runs_[p].back();
        used_[p] += need[p];
        r.b1 = std::max(r.b1, b1[p]);
        const uint64_t a = layout_.piece_base[layer][p] + uint64_t(neuron) * layout_.piece_stride[p];
        landed_.push_back(r.dst + (a - r.b0 * kIoAlign));
    }
    ++planned_;
    return true;
}

bool FlashReads::full_before(int n) const {
    if (planned_ == 0) return false;
    bool empty_holds = n <= staging_rows_, holds = planned_ + n <= staging_rows_;
    for (int p = 0; p < layout_.n_pieces(); ++p) {  // a piece's blocks and the gap a request may span before it
        const uint64_t gap = std::min<uint64_t>(coalesce_gap_ * layout_.piece_stride[p], max_request_);
        const size_t worst = size_t(n) * (blocks_of(layout_.piece_bytes[p] + gap) + 1);
        empty_holds = empty_holds && worst <= region_blocks_[p];
        holds = holds && used_[p] + worst <= region_blocks_[p];
    }
    return empty_holds && !holds;
}

const std::vector<ReadRequest>& FlashReads::requests() {
    requests_.clear();
    for (int p = 0; p < layout_.n_pieces(); ++p)
        for (const Run& r : runs_[p]) requests_.push_back({r.b0 * kIoAlign, size_t(r.b1 - r.b0) * kIoAlign, r.dst});
    return requests_;
}

const void* FlashReads::bundle(int j) {
    const int np = layout_.n_pieces();
    if (np == 1) return landed_[j];
    char* row = assembled_.data<char>() + size_t(j) * bundle_bytes_;
    size_t at = 0;
    for (int p = 0; p < np; ++p) {
        std::memcpy(row + at, landed_[size_t(j) * np + p], layout_.piece_bytes[p]);
        at += layout_.piece_bytes[p];
    }
    return row;
}

void FlashReads::clear() {
    for (int p = 0; p < layout_.n_pieces(); ++p) runs_[p].clear(), used_[p] = 0;
    landed_.clear();
    planned_ = 0;
}

}  // namespace fm
