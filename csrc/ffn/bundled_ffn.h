// SwiGLU FFN computed from neuron bundles: bundle i = [gate row i | up row i | down column i],
// each of length d_model, so everything neuron i needs is contiguous (the layout that flash
// streaming reads one neuron at a time). The rows are given as pointers, so the same code runs
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

#include "core/dtype.h"
#include "core/thread_pool.h"

namespace fm {

constexpr int kNeuronBlock = 16;

struct FfnScratch {
    float* acc;      // (n_threads, T_max, d_model) per-thread partial outputs
    float* hu;       // (n_threads, 2, T_max, kNeuronBlock) gate/up activations of one neuron block
    float* convert;  // (n_threads, scratch_floats(d_model)) f32 rows for the matrix-matrix kernels
    size_t convert_stride;
    char* block;     // (n_threads, kNeuronBlock, 3*d_model) gathered bundles of one block (elements of dt)
    int t_max;
};

struct FfnRows {
    const void* const* rows;  // (n) bundle pointers, each 3*d_model elements of dt
    int n;
    const uint8_t* mask;      // (T, n): token t uses neuron p when mask[t*n + p]; nullptr: all
};

void ffn_begin(ThreadPool& pool, int T, int d_model, const FfnScratch& s);
void ffn_accumulate(ThreadPool& pool, const float* xn, int T, int d_model, DType dt, const FfnRows& r, int lo, int hi,
                    const FfnScratch& s);
void ffn_end(ThreadPool& pool, float* out, int T, int d_model, const FfnScratch& s);  // out (T, d_model) += sum of acc

}  // namespace fm
