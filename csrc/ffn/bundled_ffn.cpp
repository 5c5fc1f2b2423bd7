#include "ffn/bundled_ffn.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/ops.h"
#include "kernels/quant/quant.h"

namespace fm {

BundleFormat BundleFormat::from_names(const std::string& gate, const std::string& up, const std::string& down) {
    const size_t n = std::strlen(kSplitSuffix);
    const bool split = down.size() > n && down.compare(down.size() - n, n, kSplitSuffix) == 0;
    BundleFormat b{format_from_name(gate), format_from_name(up),
                   format_from_name(split ? down.substr(0, down.size() - n) : down)};
    b.down_split = split;
    return b;
}

void BundleFormat::validate(int d_model, int d_ff) const {
    if (is_float()) {
        FM_ARG(up == gate && down == gate && !down_split, "bundle format ", name(),
               ": float bundles have one type for all three pieces");
        return;
    }
    FM_ARG(!down_split || can_split(down), "bundle format ", name(), ": a split down column is q4_0, q4_1 or q8_0");
    FM_ARG(!down_split || d_ff % kSplitGroup == 0, "bundle format ", name(), ": split down columns need d_ff (", d_ff,
           ") a multiple of ", kSplitGroup);
    for (int p = 0; p < 3; ++p) {
        FM_ARG(is_block_format(piece(p)), "bundle format ", name(), ": a bundle is all float or all block formats");
        FM_ARG(d_model % format_traits(piece(p)).block == 0, "bundle format ", name(), ": d_model ", d_model,
               " is not a whole number of ", format_name(piece(p)), " blocks (", format_traits(piece(p)).block, ")");
    }
}

void ffn_begin(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, const FfnScratch& s) {
    pool.run([&](int tid, int) {
        std::memset(s.acc + size_t(tid) * s.t_max * d_model, 0, sizeof(float) * size_t(T) * d_model);
    });
    if (!bf.is_float()) {
        const quant::QuantKernels& Q = quant::quant_kernels();
        const int nb = d_model / quant::kActBlock;
        for (int t = 0; t < T; ++t) Q.quantize_act(xn + size_t(t) * d_model, s.xq + size_t(t) * nb, d_model);
    }
}

namespace {
// Which accumulator a list position goes to: share `share` of `n_shares` (ThreadPool::run) owns
// the blocks of kOwnBlock positions whose index is `share` mod n_shares, and sums them in list
// order. Interleaved, not one contiguous range per share: the sparse path computes the list in
// parts [lo, hi) as their rows are read, and a part that lay within one contiguous share would
// be computed by one thread while the others wait. f(b, e) for each of the share's runs in [lo, hi).
constexpr int kOwnBlock = 4 * kNeuronBlock;
template <typename F>
void for_each_owned(int lo, int hi, int share, int n_shares, F&& f) {
    if (lo >= hi) return;
    int b = lo / kOwnBlock;
    b += ((share - b) % n_shares + n_shares) % n_shares;  // the share's first block at or after lo's
    for (; b * kOwnBlock < hi; b += n_shares) f(std::max(lo, b * kOwnBlock), std::min(hi, (b + 1) * kOwnBlock));
}

constexpr int kDecodeGroup = 4;  // bundles a decode step computes at once (gate, up, activation, down)

// Block-format bundles: per token and group of neurons, gate and up by integer dot products
// with the quantized input, the gating activation, then the down columns added in f32. A decode step works
// through kDecodeGroup bundles at a time, so each bundle's bytes are used while they are in L1,
// and asks for the next group's bundles (anywhere in the neuron cache) meanwhile.
void accumulate_blocks(ThreadPool& pool, int T, int d_model, const BundleFormat& bf, Activation act, const FfnRows& r,
                       int lo, int hi, const FfnScratch& s) {
    const quant::QuantKernels& Q = quant::quant_kernels();
    const size_t up_at = bf.offset(1, d_model), down_at = bf.offset(2, d_model), bundle = bf.bytes(d_model);
    const int nblk = d_model / quant::kActBlock;
    auto gate = Q.dot_ptrs[int(bf.gate)], up = Q.dot_ptrs[int(bf.up)];
    auto down = Q.axpy_ptrs[int(bf.down)];
    auto down_split = Q.axpy_split[int(bf.down)];
    const size_t scale_cols = size_t(bf.scale_cols(d_model));
    FM_ARG(!bf.down_split || r.down_scales, "ffn: split down columns without their scales (ffn_down_scales)");
    pool.run([&](int tid, int nt) {
        float* acc = s.acc + size_t(tid) * s.t_max * d_model;      // (T, d_model)
        float* h = s.hu + size_t(tid) * 2 * s.t_max * kNeuronBlock;  // (T, nb)
        float* u = h + size_t(s.t_max) * kNeuronBlock;                // (T, nb)
        const int step = T == 1 ? kDecodeGroup : kNeuronBlock;
        for_each_owned(lo, hi, tid, nt, [&](int p0, int p1) {
            for (int p = p0; p < p1; p += step) {
                const int nb = p1 - p < step ? p1 - p : step;
                if (T == 1)
                    for (int j = p + step; j < p + 2 * step && j < p1; ++j)
                        for (size_t off = 0; off < bundle; off += 64)
                            __builtin_prefetch(static_cast<const char*>(r.rows[j]) + off);
                const uint16_t* scales[kNeuronBlock];  // nb <= step <= kNeuronBlock
                if (bf.down_split)  // each neuron's group of 32 in the table
                    for (int j = 0; j < nb; ++j)
                        scales[j] = r.down_scales +
                                    size_t(r.ids ? r.ids[p + j] : p + j) / BundleFormat::kSplitGroup * scale_cols;
                for (int t = 0; t < T; ++t) {
                    float* ht = h + t * kNeuronBlock;
                    if (r.ready) {  // one token: some activations computed early, the others now
                        const void* todo[kNeuronBlock];
                        int at[kNeuronBlock], m = 0;
                        for (int j = 0; j < nb; ++j)
                            if (r.ready[p + j]) ht[j] = r.early[p + j];
                            else todo[m] = r.rows[p + j], at[m++] = j;
                        if (m) {
                            float g[kNeuronBlock], v[kNeuronBlock];
                            gate(g, s.xq, todo, 0, d_model, m);
                            up(v, s.xq, todo, up_at, d_model, m);
                            kernels().gated(g, v, m, act);
                            for (int i = 0; i < m; ++i) ht[at[i]] = g[i];
                        }
                    } else {
                        gate(ht, s.xq + size_t(t) * nblk, r.rows + p, 0, d_model, nb);
                        up(u + t * kNeuronBlock, s.xq + size_t(t) * nblk, r.rows + p, up_at, d_model, nb);
                        kernels().gated(ht, u + t * kNeuronBlock, nb, act);
                    }
                    if (r.mask)
                        for (int j = 0; j < nb; ++j)
                            if (!r.mask[size_t(t) * r.n + p + j]) ht[j] = 0.0f;
                    if (bf.down_split)
                        down_split(acc + size_t(t) * d_model, ht, r.rows + p, down_at, scales, d_model, nb);
                    else
                        down(acc + size_t(t) * d_model, ht, r.rows + p, down_at, d_model, nb);
                }
            }
        });
    });
}
}  // namespace

void ffn_activate_early(ThreadPool& pool, int d_model, const BundleFormat& bf, Activation act, const FfnRows& r,
                        const int32_t* positions, int n, float* early, uint8_t* ready, const FfnScratch& s) {
    FM_ARG(!bf.is_float(), "ffn: early activations are for block-format bundles");
    const quant::QuantKernels& Q = quant::quant_kernels();
    auto gate = Q.dot_ptrs[int(bf.gate)], up = Q.dot_ptrs[int(bf.up)];
    const size_t up_at = bf.offset(1, d_model);
    pool.parallel_dynamic(size_t(n), kDecodeGroup, [&](size_t b, size_t e, int) {
        for (size_t i = b; i < e; i += kDecodeGroup) {
            const int m = int(e - i < size_t(kDecodeGroup) ? e - i : kDecodeGroup);
            const void* rows[kDecodeGroup];
            float g[kDecodeGroup], v[kDecodeGroup];
            for (int j = 0; j < m; ++j) rows[j] = r.rows[positions[i + j]];
            gate(g, s.xq, rows, 0, d_model, m);
            up(v, s.xq, rows, up_at, d_model, m);
            kernels().gated(g, v, m, act);
            for (int j = 0; j < m; ++j) early[positions[i + j]] = g[j], ready[positions[i + j]] = 1;
        }
    });
}

void ffn_accumulate(ThreadPool& pool, const float* xn, int T, int d_model, const BundleFormat& bf, Activation act,
                    const FfnRows& r, int lo, int hi, const FfnScratch& s) {
    if (!bf.is_float()) return accumulate_blocks(pool, T, d_model, bf, act, r, lo, hi, s);
    const DType dt = bf.float_type();
    const Kernels& K = kernels();
    const int di = int(dt);
    const size_t esz = dtype_size(dt), row_bytes = size_t(3) * d_model * esz;
    pool.run([&](int tid, int nt) {
        float* acc = s.acc + size_t(tid) * s.t_max * d_model;  // (T, d_model)
        float* h = s.hu + size_t(tid) * 2 * s.t_max * kNeuronBlock;  // (T, nb)
        float* u = h + size_t(s.t_max) * kNeuronBlock;                // (T, nb)
        float* conv = s.convert + tid * s.convert_stride;
        char* gathered = s.block + size_t(tid) * kNeuronBlock * row_bytes;
        for_each_owned(lo, hi, tid, nt, [&](int p0, int p1) {
            if (T == 1 && !r.mask) {  // decode: one fused pass over this run's bundles
                K.ffn_decode[di](acc, xn, r.rows + p0, d_model, p1 - p0, act);
                return;
            }
            for (int p = p0; p < p1; p += kNeuronBlock) {
                const int nb = p1 - p < kNeuronBlock ? p1 - p : kNeuronBlock;
                // the block's bundles as one matrix: in place when consecutive (dense), else gathered
                const char* b = static_cast<const char*>(r.rows[p]);
                bool consecutive = true;
                for (int j = 1; j < nb && consecutive; ++j) consecutive = r.rows[p + j] == b + j * row_bytes;
                if (!consecutive) {
                    for (int j = 0; j < nb; ++j) std::memcpy(gathered + j * row_bytes, r.rows[p + j], row_bytes);
                    b = gathered;
                }
                const size_t ld = size_t(3) * d_model;
                K.gemm[di](h, kNeuronBlock, xn, d_model, T, b, ld, d_model, nb, conv);            // gate
                K.gemm[di](u, kNeuronBlock, xn, d_model, T, b + d_model * esz, ld, d_model, nb, conv);  // up
                for (int t = 0; t < T; ++t) {
                    kernels().gated(h + t * kNeuronBlock, u + t * kNeuronBlock, nb, act);
                    if (r.mask)
                        for (int j = 0; j < nb; ++j)
                            if (!r.mask[size_t(t) * r.n + p + j]) h[t * kNeuronBlock + j] = 0.0f;
                }
                K.accumulate[di](acc, d_model, h, kNeuronBlock, T, b + 2 * d_model * esz, ld, d_model, nb, conv);  // down
            }
        });
    });
}

void ffn_end(ThreadPool& pool, float* out, int T, int d_model, const FfnScratch& s) {
    auto reduce = [&](size_t b, size_t e, int) {
        for (int t = 0; t < pool.size(); ++t) {
            const float* a = s.acc + size_t(t) * s.t_max * d_model;
            for (size_t i = b; i < e; ++i) out[i] += a[i];
        }
    };
    if (T == 1) reduce(0, d_model, 0);  // as small as decode's: not worth a dispatch
    else pool.parallel_for(size_t(T) * d_model, 16, reduce);
}

}  // namespace fm
