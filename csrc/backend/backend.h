// The operations a forward pass is made of. The decoder (model/decoder.cpp) is one flat function
// over the layers that calls these; a backend runs them where its activations live. CpuBackend
// (cpu_backend.h) is the engine on the CPU: the SIMD and block-format kernels over a thread pool.
// A CUDA backend implements the same calls over device memory (kernels/cuda/).
//
// Activations are (T, width) row-major float rows in the backend's memory; weights are Tensors
// in their own formats (core/format.h); the KV cache is the model's KvCache.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "core/activation.h"
#include "core/buffer.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "ffn/bundled_ffn.h"

namespace fm {

class KvCache;
class SparseFfn;

// One output of linear(): Y (T, ldy), N columns written, = X W^T.
struct Projection {
    float* Y;
    size_t ldy;
    const Tensor* W;  // (N, K) weights
    size_t N;
    const char* data = nullptr;  // W's rows where they are not W's own bytes (streamed, staged)
};

// Causal GQA attention of T queries: token t at position pos[t] of the sequence in KV slot
// slot[t] attends to positions [max(attend_from, pos[t] - window + 1), pos[t]] (window 0: from
// attend_from), its own key and value already in the cache.
struct AttentionCall {
    const float* q;  // (T, n_heads * head_dim)
    float* out;      // (T, n_heads * head_dim)
    int T;
    const int* pos;
    const int* slot;
    const KvCache* kv;
    int layer;
    int n_heads, n_kv_heads, head_dim;
    int window;
    int attend_from;
    float scale;  // of the scores
};

// The FFN of one layer over the T rows xn (after the FFN norm), added into out (T, d_model).
// One of: the sparse FFN (sparse != null: the neurons its predictor picks, resident or streamed),
// the three matrices (gate, up, down present), or every resident neuron bundle (bundles).
struct FfnCall {
    int layer;
    float* out;
    const float* xn;
    int T;
    int d_model, d_ff;
    Activation activation;
    SparseFfn* sparse;
    const int* slot;  // the sparse FFN's per-sequence windows: each token's KV slot and position
    const int* pos;
    const Tensor *gate, *up, *down;  // the matrices, or null
    const char* bundles;             // (d_ff, BundleFormat::bytes(d_model)) resident bundles, or null
    const uint16_t* down_scales;     // their split down scales (BundleFormat::down_split), or null
    BundleFormat bundle;
};

// What the backend's scratch must hold, known once the weights' formats are.
struct ScratchNeeds {
    int threads = 1;
    int chunk = 1;        // rows per call
    int max_context = 1;  // attention scores per query
    int query_group = 1;  // query heads per KV head: the queries whose scores are held at once
    int d_model = 0, q_dim = 0, d_ff = 0;
    BundleFormat bundle;          // the FFN bundles' formats
    bool block_formats = false;   // some matrix or bundle is in a block format: 8-bit activations
    bool precise_head = false;    // the LM head is in a block format: 16-bit activations
    bool wide_float_rows = false; // a float matrix has d_ff-long rows (a float down matrix)
    bool ffn_matrices = false;    // some layer's FFN is the three matrices: (chunk, d_ff) outputs
};

class Backend {
  public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;

    // Memory for activations and run state, in the backend's memory.
    virtual Buffer allocate(size_t bytes) = 0;
    // Sizes the scratch the calls below use (grows only); scratch_bytes() counts it.
    virtual void reserve(const ScratchNeeds& needs) = 0;
    virtual size_t scratch_bytes() const = 0;
    // Of what reserve(needs) sizes, the blocks that linear quantizes its input rows into (8-bit
    // for block-format weights, 16-bit for a block-format LM head).
    virtual size_t activation_bytes(const ScratchNeeds& needs) const = 0;
    // Host threads: the CPU's compute; with a device, the threads that gather streamed weights.
    virtual ThreadPool& host_pool() = 0;

    // y (rows, d) = x / sqrt(mean(x^2) + eps) * w per row (y may be x).
    virtual void rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps) = 0;
    // x (n) += y (n).
    virtual void add(float* x, const float* y, size_t n) = 0;
    // y (T, ld): each row's first n entries += b (n).
    virtual void add_bias(float* y, int T, size_t ld, const float* b, size_t n) = 0;
    // Rotary embedding of T rows of n_heads heads (row t at v + t * ld), with row t's cos and sin
    // (head_dim / 2 each) at cos + t * head_dim / 2.
    virtual void rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin) = 0;
    // Y = X (T, K) W^T for each projection. precise: block-format weights take 16-bit activations
    // (the LM head's logits); gated (an activation): the two projections are gate and up, and
    // gate's output becomes gated(gate) * up.
    virtual void linear(const float* X, int T, int K, std::initializer_list<Projection> projections,
                        bool precise = false, std::optional<Activation> gated = std::nullopt) = 0;
    virtual void attention(const AttentionCall& a) = 0;
    virtual void ffn(const FfnCall& f) = 0;
};

}  // namespace fm
