#include "backend/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ffn/sparse_ffn.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/ops.h"
#include "kernels/quant/quant.h"
#include "model/kv_cache.h"

namespace fm {

void CpuBackend::reserve(const ScratchNeeds& n) {
    needs_ = n;
    const size_t f = sizeof(float), nt = size_t(pool_.size()), chunk = size_t(n.chunk);
    const int widest = std::max({n.d_model, n.q_dim, n.d_ff});
    grow(scores_, f * nt * size_t(n.query_group) * size_t(n.max_context));
    grow(ffn_acc_, f * nt * chunk * n.d_model);
    grow(ffn_hu_, f * nt * 2 * chunk * kNeuronBlock);
    // the float matrix kernels convert rows of K weights: K is d_model or q_dim, d_ff for a float down matrix
    grow(convert_, f * nt * scratch_floats(n.wide_float_rows ? widest : std::max(n.d_model, n.q_dim)));
    if (n.bundle.is_float()) grow(ffn_block_, nt * kNeuronBlock * n.bundle.bytes(n.d_model));
    grow(ffn_rows_, sizeof(void*) * size_t(n.d_ff));
    ScratchNeeds only8 = n, only16 = n;
    only8.precise_head = only16.block_formats = false;
    grow(act_, activation_bytes(only8));
    grow(act16_, activation_bytes(only16));
    if (n.ffn_matrices) {
        grow(ffn_gate_out_, f * chunk * n.d_ff);
        grow(ffn_up_out_, f * chunk * n.d_ff);
        grow(ffn_down_out_, f * chunk * n.d_model);
    }
}

size_t CpuBackend::activation_bytes(const ScratchNeeds& n) const {
    const size_t rows = size_t(n.chunk), widest = size_t(std::max({n.d_model, n.q_dim, n.d_ff}));
    return (n.block_formats ? sizeof(quant::ActBlock) * rows * (widest / quant::kActBlock) : 0) +
           (n.precise_head ? sizeof(quant::ActBlock16) * rows * (size_t(n.d_model) / quant::kActBlock) : 0);
}

size_t CpuBackend::scratch_bytes() const {
    return scores_.size() + convert_.size() + act_.size() + act16_.size() + ffn_acc_.size() + ffn_hu_.size() +
           ffn_block_.size() + ffn_rows_.size() + ffn_gate_out_.size() + ffn_up_out_.size() + ffn_down_out_.size();
}

FfnScratch CpuBackend::ffn_scratch() {
    return {ffn_acc_.data<float>(), ffn_hu_.data<float>(), convert_.data<float>(),
            convert_.size() / sizeof(float) / pool_.size(), ffn_block_.data<char>(), act_.data<quant::ActBlock>(),
            needs_.chunk};
}

void CpuBackend::rmsnorm(float* y, const float* x, const float* w, int rows, int d, float eps) {
    for (int r = 0; r < rows; ++r) fm::rmsnorm(y + size_t(r) * d, x + size_t(r) * d, w, d, eps);
}

void CpuBackend::add(float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

void CpuBackend::add_bias(float* y, int T, size_t ld, const float* b, size_t n) {
    for (int t = 0; t < T; ++t)
        for (size_t i = 0; i < n; ++i) y[t * ld + i] += b[i];
}

void CpuBackend::rope(float* v, int T, size_t ld, int n_heads, int head_dim, const float* cos, const float* sin) {
    const size_t half = size_t(head_dim / 2);
    for (int t = 0; t < T; ++t) fm::rope(v + t * ld, n_heads, head_dim, cos + t * half, sin + t * half);
}

// Y (T, N) = X (T, K) W^T for each projection, all in one parallel region (q, k and v: one
// dispatch, not three); each thread takes its share of every matrix's rows. Matrices in a block
// format take X quantized to int8 blocks (16-bit when precise), once for all of them.
void CpuBackend::linear(const float* X, int T, int K, std::initializer_list<Projection> projections, bool precise,
                        std::optional<Activation> gated) {
    const Kernels& k = kernels();
    const quant::QuantKernels& qk = quant::quant_kernels();
    const size_t cs = convert_.size() / sizeof(float) / pool_.size();
    bool quantized = false;
    for (const Projection& p : projections) quantized |= is_block_format(p.W->format);
    FM_ARG(T <= needs_.chunk && (!quantized || (precise ? act16_.size() : act_.size())),
           "linear: scratch not reserved for ", T, " rows of ", precise ? "16" : "8", "-bit activations");
    auto* act = act_.data<quant::ActBlock>();
    auto* act16 = act16_.data<quant::ActBlock16>();
    const int act_row = K / quant::kActBlock;
    auto quantize_rows = [&](size_t t0, size_t t1, int) {
        for (size_t t = t0; t < t1; ++t) {
            if (precise) qk.quantize_act16(X + t * K, act16 + t * act_row, K);
            else qk.quantize_act(X + t * K, act + t * act_row, K);
        }
    };
    if (quantized && T < 2 * pool_.size()) quantize_rows(0, size_t(T), 0);  // a dispatch costs more
    else if (quantized) pool_.parallel_for(size_t(T), 1, quantize_rows);
    FM_ARG(!gated || (projections.size() == 2 && projections.begin()[0].N == projections.begin()[1].N),
           "linear: gated takes gate and up projections of the same size");
    auto rows = [&](const Projection& p, size_t n0, size_t n1, int tid) {  // output rows [n0, n1) of p
        const Tensor& W = *p.W;
        const char* w = (p.data ? p.data : W.data()) + n0 * W.row_bytes;
        if (W.interleaved && precise)  // n0 and n1 are multiples of 8: whole groups
            qk.matmul16_x8[int(W.format)](p.Y + n0, p.ldy, act16, T, w, W.row_bytes, K, int(n1 - n0));
        else if (W.interleaved)
            qk.matmul_x8[int(W.format)](p.Y + n0, p.ldy, act, T, w, W.row_bytes, K, int(n1 - n0));
        else if (is_block_format(W.format) && precise)
            qk.matmul16[int(W.format)](p.Y + n0, p.ldy, act16, T, w, W.row_bytes, K, int(n1 - n0));
        else if (is_block_format(W.format))
            qk.matmul[int(W.format)](p.Y + n0, p.ldy, act, T, w, W.row_bytes, K, int(n1 - n0));
        else
            k.gemm[int(W.format)](p.Y + n0, p.ldy, X, K, T, w, K, K, int(n1 - n0), convert_.data<float>() + tid * cs);
    };
    // Blocks of 16 output rows, taken by whichever thread is free (ThreadPool::parallel_dynamic).
    if (gated) {  // a block: its gate rows, its up rows, then the activation over them
        const Projection &gate = projections.begin()[0], &up = projections.begin()[1];
        pool_.parallel_dynamic(gate.N, 16, [&](size_t n0, size_t n1, int tid) {
            rows(gate, n0, n1, tid);
            rows(up, n0, n1, tid);
            for (int t = 0; t < T; ++t)
                k.gated(gate.Y + t * gate.ldy + n0, up.Y + t * up.ldy + n0, int(n1 - n0), *gated);
        });
        return;
    }
    size_t blocks = 0;  // every projection's blocks, one after another
    for (const Projection& p : projections) blocks += (p.N + 15) / 16;
    pool_.parallel_dynamic(blocks, 1, [&](size_t b0, size_t b1, int tid) {
        size_t first = 0;
        for (const Projection& p : projections) {
            const size_t n_blocks = (p.N + 15) / 16;
            const size_t a = std::max(b0, first), b = std::min(b1, first + n_blocks);
            if (a < b) rows(p, (a - first) * 16, std::min(p.N, (b - first) * 16), tid);
            first += n_blocks;
        }
    });
}

// Per (token, head), scores = K q (a GEMV over the cached keys), softmax, out = V^T scores (an
// accumulate over the cached values); the positions lie in up to two runs of cache rows (a ring
// wraps). Work items are taken in small chunks by whichever thread is free, which also balances
// the growing causal lengths.
void CpuBackend::attention(const AttentionCall& a) {
    const Kernels& k = kernels();
    const KvCache& kv = *a.kv;
    const int kvt = int(kv.dtype());
    const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads, rows = kv.rows(a.layer);
    const size_t kv_dim = size_t(a.n_kv_heads) * hd, q_dim = size_t(a.n_heads) * hd, esz = dtype_size(kv.dtype());
    const size_t per_thread = scores_.size() / sizeof(float) / pool_.size();
    FM_ARG(per_thread >= size_t(group) * size_t(rows), "attention: scratch not reserved for ", group, " x ", rows,
           " scores");
    // one item per token and KV head: its group of query heads reads the KV rows once
    pool_.parallel_dynamic(size_t(a.T) * a.n_kv_heads, 1, [&](size_t i0, size_t i1, int tid) {
        float* sc = scores_.data<float>() + size_t(tid) * per_thread;
        for (int item = int(i0); item < int(i1); ++item) {
            const int t = item / a.n_kv_heads, kvh = item % a.n_kv_heads;
            const char* kc = kv.keys(a.layer, a.slot[t]) + kvh * hd * esz;  // (rows, kv_dim): this token's sequence
            const char* vc = kv.values(a.layer, a.slot[t]) + kvh * hd * esz;
            const int p = a.pos[t], first = std::max(a.attend_from, a.window > 0 ? p - a.window + 1 : 0);
            const int n_pos = p - first + 1, r0 = first % rows;
            const int len[2] = {std::min(n_pos, rows - r0), n_pos - std::min(n_pos, rows - r0)};  // [r0, ..), [0, ..)
            const void* K[2] = {kc + size_t(r0) * kv_dim * esz, kc};
            const void* V[2] = {vc + size_t(r0) * kv_dim * esz, vc};
            const size_t at = t * q_dim + size_t(kvh) * group * hd;
            k.attend[kvt](a.out + at, a.q + at, group, hd, K, V, len, kv_dim, a.scale, sc, size_t(n_pos));
        }
    });
}

void CpuBackend::ffn(const FfnCall& f) {
    const FfnScratch s = ffn_scratch();
    const size_t d = size_t(f.d_model), ff = size_t(f.d_ff);
    if (f.sparse) {
        f.sparse->forward(pool_, f.layer, f.out, f.xn, f.T, s, f.slot, f.pos);
    } else if (f.gate) {  // the three matrices: down(act(gate x) * up x)
        FM_ARG(ffn_gate_out_.size(), "ffn: scratch not reserved for the FFN matrices");
        float* g = ffn_gate_out_.data<float>();
        float* u = ffn_up_out_.data<float>();
        float* down = ffn_down_out_.data<float>();
        linear(f.xn, f.T, f.d_model, {{g, ff, f.gate, ff}, {u, ff, f.up, ff}}, false, f.activation);
        linear(g, f.T, f.d_ff, {{down, d, f.down, d}}, false, std::nullopt);
        add(f.out, down, size_t(f.T) * d);
    } else {  // dense: every bundle, in place
        const void** rows = ffn_rows_.data<const void*>();
        const size_t row = f.bundle.bytes(f.d_model);
        for (int i = 0; i < f.d_ff; ++i) rows[i] = f.bundles + i * row;
        ffn_begin(pool_, f.xn, f.T, f.d_model, f.bundle, s);
        ffn_accumulate(pool_, f.xn, f.T, f.d_model, f.bundle, f.activation, {rows, f.d_ff, nullptr, nullptr, f.down_scales},
                       0, f.d_ff, s);
        ffn_end(pool_, f.out, f.T, f.d_model, s);
    }
}

}  // namespace fm
