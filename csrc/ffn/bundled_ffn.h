// Gated FFN (SwiGLU or GeGLU, core/activation.h) computed from neuron bundles: bundle i = [gate row i | up row i | down column i],
// each of length d_model, so everything neuron i needs is contiguous (the layout that flash
// streaming reads one neuron at a time). A bundle is either in one float type (f32, f16, bf16)
// or in block formats (BundleFormat): gate and up rows as a GGUF stores them, the down column
// requantized along d_model; the block path quantizes the input once per call to 8-bit blocks
// and computes with integer dot products, as the dense block-format matrices do. The rows are given as pointers, so the same code runs
// over the resident bundle matrix (dense), and over rows gathered from the neuron cache and the
// read buffers (sparse, flash streaming).
//
// Use: ffn_begin, then ffn_accumulate over one or more parts [lo, hi) of the row list (the sparse
// path computes each part as soon as its rows have been read), then ffn_end. Each thread owns
// a fixed share of the list (ThreadPool::chunk), and sums its share in list order into its own
// accumulator, so the result does not depend on how the list was cut into parts.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/activation.h"
#include "core/dtype.h"
#include "core/format.h"
#include "core/thread_pool.h"
#include "kernels/quant/blocks.h"

namespace fm {

constexpr int kNeuronBlock = 16;

// The formats of a bundle's three pieces (gate row, up row, down column; d_model weights each),
// stored one after the other without padding.
struct BundleFormat {
    Format gate = Format::F32, up = Format::F32, down = Format::F32;

    // all three one float type (the float kernels), else all three block formats
    bool is_float() const { return !is_block_format(gate); }
    DType float_type() const { return DType(int(gate)); }
    Format piece(int p) const { return p == 0 ? gate : p == 1 ? up : down; }
    size_t piece_bytes(int p, int d_model) const { return format_row_bytes(piece(p), d_model); }
    size_t offset(int p, int d_model) const {  // of piece p in the bundle
        size_t n = 0;
        for (int q = 0; q < p; ++q) n += piece_bytes(q, d_model);
        return n;
    }
    size_t bytes(int d_model) const { return offset(3, d_model); }  // one bundle
    std::string name() const {
        return std::string(format_name(gate)) + "," + format_name(up) + "," + format_name(down);
    }
    // Raises unless the pieces are one float type or three block formats whose blocks divide d_model.
    void validate(int d_model) const;
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
};

// Clears the accumulators; block-format bundles: quantizes the input xn (T, d_model) into s.xq.
void ffn_begin(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, const FfnScratch& s);
void ffn_accumulate(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, Activation act,
                    const FfnRows& r, int lo, int hi, const FfnScratch& s);
void ffn_end(ThreadPool& pool, float* out, int T, int d_model, const FfnScratch& s);  // out (T, d_model) += sum of acc

}  // namespace fm
