// Sparsity predictor, one per layer: a low-rank MLP trained by `flashmem calibrate` to score how
// much each neuron will contribute, |silu(gate_i . x) * (up_i . x)|, from the FFN input x:
//   scores (n_neurons) = B relu(A x + a) + b,   A (rank, D), B (n_neurons, rank) in the weights'
//   dtype, a and b f32 (input normalisation folded into A and a).
// It is small (at most 5% of the FFN's bytes), resident in DRAM, and runs on the GEMM kernel.
#pragma once
#include <cstddef>
#include <vector>

#include "core/buffer.h"
#include "core/dtype.h"
#include "core/thread_pool.h"

namespace fm {

struct PredictorLayer {
    Buffer A;  // (rank, D) dtype
    Buffer a;  // (rank) f32
    Buffer B;  // (n_neurons, rank) dtype
    Buffer b;  // (n_neurons) f32
};

class Predictor {
  public:
    void init(int n_layers, int n_neurons, int D, DType dt, int t_max, int n_threads);
    bool loaded() const;           // every layer has its four tensors
    int rank() const { return rank_; }
    size_t bytes() const;          // owned: weights and scratch
    // kind: "A", "a", "B" or "b"; data in the layout above (A, B of dtype dt; a, b f32).
    Buffer& tensor(int layer, const std::string& kind, int rank);
    // scores (T, n_neurons) of the FFN inputs xn (T, D) of layer l.
    void scores(ThreadPool& pool, int l, const float* xn, int T, float* out);

  private:
    int n_neurons_ = 0, D_ = 0, rank_ = 0, t_max_ = 0, n_threads_ = 1;
    DType dt_ = DType::F32;
    std::vector<PredictorLayer> layers_;
    Buffer hidden_;   // (t_max, rank)
    Buffer convert_;  // (n_threads, scratch_floats(max(D, rank)))
};

}  // namespace fm
