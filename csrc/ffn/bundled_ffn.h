// SwiGLU FFN computed from neuron bundles: bundle i = [gate row i | up row i | down column i],
// each of length d_model, so everything neuron i needs is contiguous (the layout that flash
// streaming reads one neuron at a time). out += down(silu(gate x) * up x) for T tokens.
// The dense path passes all neurons; the sparse path (flash streaming) will pass a gathered set.
#pragma once
#include <cstddef>

#include "core/dtype.h"
#include "core/thread_pool.h"

namespace fm {

struct FfnScratch {
    float* acc;      // (n_threads, T_max, d_model) per-thread partial outputs
    float* hu;       // (n_threads, 2, T_max, kNeuronBlock) gate/up activations of one neuron block
    float* convert;  // (n_threads, scratch_floats(d_model)) f32 rows for the matrix-matrix kernels
    size_t convert_stride;
    int t_max;
};

constexpr int kNeuronBlock = 16;

// out (T, D) += FFN(xn (T, D)) over bundles (n_neurons, 3*D) of dtype dt.
void bundled_ffn(ThreadPool& pool, float* out, const float* xn, int T, int D, const void* bundles, DType dt,
                 int n_neurons, const FfnScratch& s);

}  // namespace fm
