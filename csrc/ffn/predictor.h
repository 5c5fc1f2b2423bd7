// Sparsity predictor, one per layer, fitted by `flashmem calibrate`: it estimates each neuron's
// contribution |silu(gate_i . x) * (up_i . x)| from 1-bit copies of the gate and up matrices,
//   gate_i . x  ~  row_i * sum_k sign(W_ik) * col_k * x_k
// (signs packed 8 per byte; |W| approximated by the rank-1 product row col^T, row refitted on
// calibration data). Both matrices together take 2 bits per weight pair, about 4.5% of an f16
// FFN's bytes; resident in DRAM.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/thread_pool.h"

namespace fm {

struct PredictorLayer {
    Buffer gate_sign, up_sign;  // (n_neurons, row_bytes) uint8: bit k set where W_ik > 0
    Buffer gate_row, up_row;    // (n_neurons) f32
    Buffer gate_col, up_col;    // (D) f32
};

class Predictor {
  public:
    void init(int n_layers, int n_neurons, int D, int t_max);
    bool loaded() const;  // every layer has its six tensors
    size_t bytes() const;
    int sign_row_bytes() const { return (D_ + 7) / 8; }
    static size_t bytes_for(int n_layers, int n_neurons, int D, int t_max);
    // kind: gate_sign, up_sign (uint8), gate_row, up_row (n_neurons f32), gate_col, up_col (D f32)
    Buffer& tensor(int layer, const std::string& kind, std::vector<int64_t>& expect_shape, const char*& dtype);
    // scores (T, n_neurons) of the FFN inputs xn (T, D) of layer l.
    void scores(ThreadPool& pool, int l, const float* xn, int T, float* out);

  private:
    int n_neurons_ = 0, D_ = 0, t_max_ = 0;
    std::vector<PredictorLayer> layers_;
    Buffer z_;  // (t_max, 2, D) col * x for gate and up
};

// Reference for tests: the same scores in double precision.
void predictor_scores_ref(const uint8_t* gate_sign, const uint8_t* up_sign, const float* gate_row,
                          const float* up_row, const float* gate_col, const float* up_col, const float* x, int D,
                          int n_neurons, float* out);

}  // namespace fm
