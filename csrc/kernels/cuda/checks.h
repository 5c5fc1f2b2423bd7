// Argument checks of the CUDA entry points (cuda_kernels.h), shared by the kernels' host code and
// the stub, so that bad arguments raise ValueError naming the argument on every build, before
// any device is touched.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "core/error.h"
#include "core/format.h"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::cuda {

inline void check_gemv(Format f, int T, int N, int K) {
    FM_ARG(int(f) >= 0 && int(f) < kFormats, "cuda gemv: unknown format id ", int(f));
    FM_ARG(T >= 1 && T <= kMaxGemvTokens, "cuda gemv: T (tokens) must be in [1, ", kMaxGemvTokens, "], got ", T);
    FM_ARG(N >= 1, "cuda gemv: N (rows of W) must be >= 1, got ", N);
    const FormatTraits& t = format_traits(f);
    FM_ARG(K >= 1 && K % t.block == 0, "cuda gemv: K = ", K, " must be a positive multiple of the ", t.name,
           " block (", t.block, " weights)");
}

inline void check_rmsnorm(int rows, int d, float eps) {
    FM_ARG(rows >= 1, "cuda rmsnorm: rows must be >= 1, got ", rows);
    FM_ARG(d >= 1, "cuda rmsnorm: d (row width) must be >= 1, got ", d);
    FM_ARG(eps >= 0, "cuda rmsnorm: eps must be >= 0, got ", eps);
}

inline void check_rope(int T, size_t ld, int n_heads, int head_dim) {
    FM_ARG(T >= 1, "cuda rope: T (rows) must be >= 1, got ", T);
    FM_ARG(n_heads >= 1, "cuda rope: n_heads must be >= 1, got ", n_heads);
    FM_ARG(head_dim >= 2 && head_dim % 2 == 0, "cuda rope: head_dim must be even and >= 2, got ", head_dim);
    FM_ARG(ld >= size_t(n_heads) * head_dim, "cuda rope: ld (row stride) ", ld, " is less than n_heads * head_dim = ",
           size_t(n_heads) * head_dim);
}

inline void check_attention(DType kv_dtype, const int32_t* lengths, int B, int rows, int n_heads, int n_kv_heads,
                            int head_dim, float scale, int chunk) {
    FM_ARG(kv_dtype == DType::F32 || kv_dtype == DType::F16, "cuda attention: kv_dtype must be f32 or f16, got ",
           dtype_name(kv_dtype));
    FM_ARG(B >= 1, "cuda attention: B (sequences) must be >= 1, got ", B);
    FM_ARG(rows >= 1, "cuda attention: rows (cache rows per sequence) must be >= 1, got ", rows);
    FM_ARG(head_dim >= 1 && head_dim <= kMaxHeadDim, "cuda attention: head_dim must be in [1, ", kMaxHeadDim,
           "], got ", head_dim);
    FM_ARG(n_kv_heads >= 1 && n_heads >= 1 && n_heads % n_kv_heads == 0, "cuda attention: n_heads (", n_heads,
           ") must be a positive multiple of n_kv_heads (", n_kv_heads, ")");
    FM_ARG(chunk >= 0 && chunk <= kMaxAttnChunk, "cuda attention: chunk must be in [0, ", kMaxAttnChunk, "], got ",
           chunk);
    FM_ARG(scale > 0 && std::isfinite(scale), "cuda attention: scale must be positive and finite, got ", scale);
    if (lengths)  // host pointers: each sequence holds [1, rows] positions
        for (int b = 0; b < B; ++b)
            FM_ARG(lengths[b] >= 1 && lengths[b] <= rows, "cuda attention: lengths[", b, "] = ", lengths[b],
                   " must be in [1, rows = ", rows, "]");
}

inline void check_argmax(int T, int vocab) {
    FM_ARG(T >= 1, "cuda argmax: T (rows) must be >= 1, got ", T);
    FM_ARG(vocab >= 1, "cuda argmax: vocab must be >= 1, got ", vocab);
}

}  // namespace fm::cuda
