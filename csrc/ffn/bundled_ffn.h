// Gated FFN (SwiGLU or GeGLU, core/activation.h) computed from neuron bundles: bundle i = [gate row i | up row i | down column i],
// each of length d_model, so everything neuron i needs is contiguous (the layout that flash
// streaming reads one neuron at a time). A bundle is either in one float type (f32, f16, bf16)
// or in block formats (BundleFormat): gate and up rows as a GGUF stores them, the down column
// either split (the GGUF's own quants of column i, whose scales, shared by 32 neurons, stay
// resident in a per-layer table: see BundleFormat::down_split) or requantized along d_model; the
// block path quantizes the input once per call to 8-bit blocks and computes with integer dot
// products, as the dense block-format matrices do. The rows are given as pointers, so the same code runs
// over the resident bundle matrix (dense), and over rows gathered from the neuron cache and the
// read buffers (sparse, flash streaming).
//
// Use: ffn_begin, then ffn_accumulate over one or more parts [lo, hi) of the row list (the sparse
// path computes each part as soon as its rows have been read), then ffn_end. Each thread owns
// a fixed share of the list (every n_threads-th block of 64 positions, so that every part is
// spread over all threads), and sums its share in list order into its own accumulator, so the
// result does not depend on how the list was cut into parts where the cuts fall on multiples of
// 16 positions (a cut inside a group of 4 (decode) or 16 neurons regroups the down columns' sums,
// which rounds differently in the last bits; the sparse path's read rounds end where their
// staging buffer is full, anywhere).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/activation.h"
#include "core/dtype.h"
#include "core/format.h"
#include "core/thread_pool.h"
#include "kernels/quant/blocks.h"

namespace fm {

constexpr int kNeuronBlock = 16;

// The formats of a bundle's three pieces (gate row, up row, down column; d_model weights each),
// stored one after the other without padding.
//
// A split down column (down_split; q4_0, q4_1 or q8_0) is exactly the GGUF's down matrix: its blocks
// run along d_ff, so the 32 neurons of a block share one scale (and q4_1 one min) per output row.
// The bundle holds column i's quants only (split_quant_bytes: d_model/32 chunks of 16 bytes, element
// k of a chunk in byte k % 16, low nibble for k < 16, high for k >= 16; q8_0: 32 int8 a chunk), and
// the layer's table "ffn_down_scales" (d_ff/32, planes * d_model) f16 holds, per group of 32
// neurons, the d_model scales (then the d_model mins for q4_1), resident. Nothing is requantized,
// and a q4_0 bundle is 6.5 KiB at Llama-3-8B shapes instead of 8.75 with a q8_0 column.
struct BundleFormat {
    Format gate = Format::F32, up = Format::F32, down = Format::F32;
    bool down_split = false;

    static constexpr const char* kSplitSuffix = ":split";  // the down piece's name when split ("q4_0:split")
    static constexpr int kSplitGroup = 32;                  // neurons sharing a row of scales
    static bool can_split(Format f) { return f == Format::Q4_0 || f == Format::Q4_1 || f == Format::Q8_0; }
    static size_t split_quant_bytes(Format f, int d_model) { return f == Format::Q8_0 ? d_model : d_model / 2; }
    static int split_planes(Format f) { return f == Format::Q4_1 ? 2 : 1; }  // scales (and mins) per row

    // all three one float type (the float kernels), else all three block formats
    bool is_float() const { return !is_block_format(gate); }
    DType float_type() const { return DType(int(gate)); }
    Format piece(int p) const { return p == 0 ? gate : p == 1 ? up : down; }
    size_t piece_bytes(int p, int d_model) const {
        return p == 2 && down_split ? split_quant_bytes(down, d_model) : format_row_bytes(piece(p), d_model);
    }
    size_t offset(int p, int d_model) const {  // of piece p in the bundle
        size_t n = 0;
        for (int q = 0; q < p; ++q) n += piece_bytes(q, d_model);
        return n;
    }
    size_t bytes(int d_model) const { return offset(3, d_model); }  // one bundle
    std::string piece_name(int p) const {
        return std::string(format_name(piece(p))) + (p == 2 && down_split ? kSplitSuffix : "");
    }
    std::string name() const { return piece_name(0) + "," + piece_name(1) + "," + piece_name(2); }
    // From three piece names (the down one may end in kSplitSuffix); raises for an unknown name.
    static BundleFormat from_names(const std::string& gate, const std::string& up, const std::string& down);
    // The shape of a layer's table of split down scales: (d_ff / kSplitGroup, planes * d_model).
    int64_t scale_rows(int d_ff) const { return d_ff / kSplitGroup; }
    int64_t scale_cols(int d_model) const { return int64_t(split_planes(down)) * d_model; }
    // Raises unless the pieces are one float type or three block formats whose blocks divide d_model
    // (a split down: q4_0, q4_1 or q8_0, and d_ff a multiple of 32 when given).
    void validate(int d_model, int d_ff = 0) const;
};

struct FfnScratch {
    float* acc;      // (n_threads, T_max, d_model) per-thread partial outputs
    float* hu;       // (n_threads, 2, T_max, kNeuronBlock) gate/up activations of one neuron block
    float* convert;  // (n_threads, scratch_floats(d_model)) f32 rows for the matrix-matrix kernels
    size_t convert_stride;
    char* block;     // (n_threads, kNeuronBlock, 3*d_model) gathered bundles of one block (float bundles)
    quant::ActBlock* xq;  // (t_max, d_model/32) the input's 8-bit blocks (block-format bundles)
    int t_max;
};

struct FfnRows {
    const void* const* rows;  // (n) bundle pointers, each BundleFormat::bytes(d_model) long
    int n;
    const uint8_t* mask;      // (T, n): token t uses neuron p when mask[t*n + p]; nullptr: all
    const int32_t* ids = nullptr;          // (n) the neuron each row is; nullptr: row p is neuron p
    const uint16_t* down_scales = nullptr; // split down columns: the layer's table (BundleFormat)
    // One token, block formats: the entries p with ready[p] set take their gated activation
    // act(gate . x) * (up . x) from early[p] (ffn_activate_early) instead of computing it.
    const float* early = nullptr;   // (n)
    const uint8_t* ready = nullptr; // (n)
};

// Clears the accumulators; block-format bundles: quantizes the input xn (T, d_model) into s.xq.
void ffn_begin(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, const FfnScratch& s);
void ffn_accumulate(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, Activation act,
                    const FfnRows& r, int lo, int hi, const FfnScratch& s);
void ffn_end(ThreadPool& pool, float* out, int T, int d_model, const FfnScratch& s);  // out (T, d_model) += sum of acc
// One token (T = 1), block formats, after ffn_begin: the gated activations of the list entries at
// `positions` (n of them) into early[p], with ready[p] set: the sparse path computes its cached
// neurons' gate and up while the reads of the others are in flight, and ffn_accumulate adds their
// down columns later in list order. Bit for bit what ffn_accumulate would compute for them.
void ffn_activate_early(ThreadPool& pool, int d_model, const BundleFormat& bf, Activation act, const FfnRows& r,
                        const int32_t* positions, int n, float* early, uint8_t* ready, const FfnScratch& s);

}  // namespace fm
