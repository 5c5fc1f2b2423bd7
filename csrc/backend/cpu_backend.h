// The backend on the CPU: the SIMD float kernels (kernels/cpu) and the block-format integer
// kernels (kernels/quant) over a thread pool, with per-thread scratch. Work is split in small
// chunks taken by whichever thread is free (ThreadPool::parallel_dynamic).
#pragma once
#include "backend/backend.h"

namespace fm {

class CpuBackend final : public Backend {
  public:
    explicit CpuBackend(int n_threads) : pool_(n_threads) {}
    const char* name() const override { return "cpu"; }

    Buffer allocate(size_t bytes) override { return Buffer(bytes); }
    void reserve(const ScratchNeeds& needs) override;
    size_t scratch_bytes() const override;
    size_t activation_bytes(const ScratchNeeds& needs) const override;
    ThreadPool& host_pool() override { return pool_; }

    void rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps) override;
    void add(float* x, const float* y, size_t n) override;
    void add_bias(float* y, int T, size_t ld, const float* b, size_t n) override;
    void rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin) override;
    void linear(const float* X, int T, int K, std::initializer_list<Projection> projections, bool precise,
                std::optional<Activation> gated) override;
    void attention(const AttentionCall& a) override;
    void ffn(const FfnCall& f) override;

  private:
    FfnScratch ffn_scratch();
    static void grow(Buffer& b, size_t bytes) {
        if (b.size() < bytes) b.allocate(bytes);
    }

    ThreadPool pool_;
    ScratchNeeds needs_;
    Buffer scores_;     // (n_threads, max_context) attention scores
    Buffer convert_;    // (n_threads, scratch_floats(widest float row)) rows converted to f32
    Buffer act_;        // (chunk, widest / 32) 8-bit activation blocks of a linear() or an FFN
    Buffer act16_;      // (chunk, d_model / 32) 16-bit activation blocks of the LM head
    Buffer ffn_acc_;    // (n_threads, chunk, d_model) per-thread FFN sums
    Buffer ffn_hu_;     // (n_threads, 2, chunk, kNeuronBlock) one neuron block's gate and up
    Buffer ffn_block_;  // (n_threads, kNeuronBlock, bundle) gathered float bundles
    Buffer ffn_rows_;   // (d_ff) bundle pointers of the dense FFN
    Buffer ffn_gate_out_, ffn_up_out_;  // (chunk, d_ff) each: the FFN as three matrices
    Buffer ffn_down_out_;               // (chunk, d_model)
};

}  // namespace fm
