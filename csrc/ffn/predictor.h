// Sparsity predictor, one per layer, fitted by `flashmem calibrate`: it estimates each neuron's
// contribution |act(gate_i . x) * (up_i . x)| (act: the FFN's silu or gelu) from 1-bit copies of the gate and up matrices plus
// int8 copies of their columns for the few input dims that carry most of x's energy:
//   gate_i . x  ~  row_i * sum_k sign(W_ik) * col_k * x_k  +  sum_j q_ij * scale_j * x_{dim_j}
// (signs packed 8 per byte; |W| approximated by the rank-1 product row col^T, row refitted on
// calibration data; col is 0 on the outlier dims, which the int8 part covers). Together about 4.9%
// of an f16 FFN's bytes; resident in DRAM. The sums over the signs take z = col * x in 8 bits
// (one scale per token and matrix, quantize_predictor_z): integer kernels at twice the speed of
// float ones, which matters at 7B shapes (2 x 14336 x 4096 signs a layer).
//
// The other kind, low-rank (rank r > 0, a multiple of 32): gate . x and up . x are estimated
// through r dims each,
//   h = in . x (2r: gate's r, then up's r),  gate_i . x ~ out_i . h_gate,  up_i . x ~ out_{d_ff+i} . h_up,
// in and out in q8_0, computed with the quantized matmul (kernels/quant). `flashmem calibrate`
// fits them as the best rank-r approximation of the pre-activations on calibration inputs
// (out: the top r left singular vectors of W Sigma^1/2, Sigma the inputs' second moment; in = out^T W).
// 2.1 r (d_model + d_ff) bytes a layer against d_ff d_model / 4 for the signs: at 7B shapes and
// r = 128, 5 MB against 15 MB, and a plain matmul instead of bit sums.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/activation.h"
#include "core/buffer.h"
#include "core/thread_pool.h"

namespace fm {

struct PredictorLayer {
    Buffer gate_sign, up_sign;  // (d_ff, row_bytes) uint8: bit k set where W_ik > 0
    Buffer gate_row, up_row;    // (d_ff) f32
    Buffer gate_col, up_col;    // (d_model) f32
    Buffer outlier_dims;        // (M) int32: the input dims with int8 weights
    Buffer outlier_weight;      // (d_ff, 2M) int8: gate's M columns, then up's
    Buffer outlier_scale;       // (2M) f32: weight = int8 * scale, per column
    Buffer lowrank_in;          // low-rank kind: (2r, d_model) q8_0
    Buffer lowrank_out;         // (2 d_ff, r) q8_0
};

// M = min(kOutlierDims, d_model) outlier dims per layer.
constexpr int kOutlierDims = 8;

class Predictor {
  public:
    // rank: 0 the sign predictor, r > 0 (a multiple of 32; d_model too) the low-rank one
    void init(int n_layers, int d_ff, int d_model, int t_max, Activation act, int rank = 0);
    bool loaded() const;  // every layer has its tensors (nine, or the two low-rank ones)
    size_t bytes() const;
    int rank() const { return rank_; }
    int sign_row_bytes() const { return (d_model_ + 7) / 8; }
    static size_t bytes_for(int n_layers, int d_ff, int d_model, int t_max, int rank = 0);
    int outlier_dims() const { return d_model_ < kOutlierDims ? d_model_ : kOutlierDims; }
    // kind: gate_sign, up_sign (uint8), gate_row, up_row (d_ff f32), gate_col, up_col (d_model f32),
    // outlier_dims (M int32), outlier_weight (d_ff, 2M int8), outlier_scale (2M f32); low-rank:
    // lowrank_in (2r, q8_0 row bytes of d_model), lowrank_out (2 d_ff, q8_0 row bytes of r) uint8
    Buffer& tensor(int layer, const std::string& kind, std::vector<int64_t>& expect_shape, const char*& dtype);
    // scores (T, d_ff) of the FFN inputs xn (T, d_model) of layer l.
    void scores(ThreadPool& pool, int l, const float* xn, int T, float* out);
    // Raises (naming `path`) unless every outlier dim of layer l is in [0, d_model); call once loaded.
    void check_outlier_dims(int l, const std::string& path) const;
    // Raises (naming `path`, the layer and the row) unless every q8_0 block scale of layer l's
    // `kind` (lowrank_in or lowrank_out) is finite.
    void check_lowrank(int l, const std::string& kind, const std::string& path) const;

  private:
    void lowrank_scores(ThreadPool& pool, int l, const float* xn, int T, float* out);
    size_t lowrank_in_row_bytes() const;
    size_t lowrank_out_row_bytes() const;

    int d_ff_ = 0, d_model_ = 0, t_max_ = 0, rank_ = 0;
    Activation act_ = Activation::SiLU;
    std::vector<PredictorLayer> layers_;
    Buffer z_;   // (t_max, 2, d_model + M) col * x for gate and up, then scale * x on the outlier dims
    Buffer zq_;  // (t_max, 2, d_model) int8: col * x for gate and up in 8 bits
    // low-rank scratch: x (t_max, d_model / 32) and h (t_max, 2r / 32) in 8-bit blocks, h (t_max, 2r)
    // and the up estimates (t_max, d_ff) in f32
    Buffer act_x_, act_h_, h_, up_;
};

// q = z (n) in int8 with one scale (max |z| / 127, returned; 0 and all-zero q when z is all zero),
// rounded to nearest: the predictor's z, in the engine and its reference alike. Non-finite
// values give 0 (and any scale), never an undefined conversion.
float quantize_predictor_z(const float* z, int n, int8_t* q);

// Reference for tests: the same scores in double precision, for one token x (d_model).
struct PredictorRef {
    const uint8_t *gate_sign, *up_sign;
    const float *gate_row, *up_row, *gate_col, *up_col;
    const int32_t* outlier_dims;
    const int8_t* outlier_weight;
    const float* outlier_scale;
    int M;
    Activation act;
};
void predictor_scores_ref(const PredictorRef& p, const float* x, int d_model, int d_ff, float* out);

}  // namespace fm
