#include "ffn/bundled_ffn.h"

#include <cstring>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/ops.h"

namespace fm {

void bundled_ffn(ThreadPool& pool, float* out, const float* xn, int T, int D, const void* bundles, DType dt,
                 int n_neurons, const FfnScratch& s) {
    const Kernels& K = kernels();
    const int di = int(dt);
    const size_t ld = size_t(3) * D, esz = dtype_size(dt);
    const char* base = static_cast<const char*>(bundles);
    pool.run([&](int tid, int nt) {
        float* acc = s.acc + size_t(tid) * s.t_max * D;  // (T, D)
        std::memset(acc, 0, sizeof(float) * size_t(T) * D);
        auto [n0, n1] = ThreadPool::chunk(n_neurons, tid, nt, kNeuronBlock);
        if (T == 1) {  // decode: one fused pass over this thread's bundles
            if (n0 < n1) K.ffn_decode[di](acc, xn, base + n0 * ld * esz, ld, D, int(n1 - n0));
            return;
        }
        float* h = s.hu + size_t(tid) * 2 * s.t_max * kNeuronBlock;  // (T, nb)
        float* u = h + size_t(s.t_max) * kNeuronBlock;                // (T, nb)
        float* conv = s.convert + tid * s.convert_stride;
        for (size_t n = n0; n < n1; n += kNeuronBlock) {
            const int nb = int(n1 - n < kNeuronBlock ? n1 - n : kNeuronBlock);
            const char* b = base + n * ld * esz;
            K.gemm[di](h, kNeuronBlock, xn, D, T, b, ld, D, nb, conv);            // gate
            K.gemm[di](u, kNeuronBlock, xn, D, T, b + D * esz, ld, D, nb, conv);  // up
            for (int t = 0; t < T; ++t) swiglu(h + t * kNeuronBlock, u + t * kNeuronBlock, nb);
            K.accumulate[di](acc, D, h, kNeuronBlock, T, b + 2 * D * esz, ld, D, nb, conv);  // down
        }
    });
    // out += sum over threads of acc; split across threads unless it is as small as decode's
    auto reduce = [&](size_t b, size_t e, int) {
        for (int t = 0; t < pool.size(); ++t) {
            const float* a = s.acc + size_t(t) * s.t_max * D;
            for (size_t i = b; i < e; ++i) out[i] += a[i];
        }
    };
    if (T == 1) reduce(0, D, 0);
    else pool.parallel_for(size_t(T) * D, 16, reduce);
}

}  // namespace fm
