// The CUDA kernels' entry points (kernels/cuda/cuda_kernels.h) through host arrays, for tests
// and tools, beside the CPU references they are compared against (tests/test_cuda.py). Every
// array argument is checked here, naming it, before the kernel's own checks and any device.
#include <cmath>
#include <optional>
#include <string>

#include "bindings/common.h"
#include "core/activation.h"
#include "core/format.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/checks.h"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::bindings {

using namespace nb::literals;

namespace {

using AnyArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;

std::string shape_of(const AnyArray& a) {
    std::string s = "(";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

bool is_f32(const AnyArray& a) { return a.dtype() == nb::dtype<float>(); }
bool is_f16(const AnyArray& a) {  // numpy float16, or its raw bits as uint16
    return a.dtype() == nb::dlpack::dtype{uint8_t(nb::dlpack::dtype_code::Float), 16, 1} ||
           a.dtype() == nb::dtype<uint16_t>();
}
const float* f32_data(const AnyArray& a) { return static_cast<const float*>(a.data()); }

// A float32 array of 1 or 2 dimensions as (rows, cols).
std::pair<size_t, size_t> rows_cols(const AnyArray& a, const char* fn, const char* name) {
    FM_ARG(is_f32(a) && (a.ndim() == 1 || a.ndim() == 2), fn, ": ", name, " must be a float32 array of 1 or 2 ",
           "dimensions, got shape ", shape_of(a));
    return a.ndim() == 2 ? std::make_pair(a.shape(0), a.shape(1)) : std::make_pair(size_t(1), a.shape(0));
}

// A new zeroed float32 array of a's shape: (rows, cols) if a is 2-D, else (cols,).
nb::ndarray<nb::numpy, float> like(const AnyArray& a, size_t rows, size_t cols) {
    return a.ndim() == 2 ? numpy_owned<float>({rows, cols}) : numpy_owned<float>({cols});
}

Activation activation_of(const std::string& name, const char* fn) {
    Activation act;
    FM_ARG(activation_from_name(name, act), fn, ": activation must be 'silu' or 'gelu_tanh', got '", name, "'");
    return act;
}

// y = x W^T for x (T, K) or (K,) and w (N, row bytes) uint8 in a block format, or (N, K) f32,
// f16 (float16 or uint16 bits), bf16 (uint16 bits).
nb::ndarray<nb::numpy, float> py_gemv(AnyArray x, AnyArray w, const std::string& format, bool emulate) {
    const Format f = format_from_name(format);
    const auto [T, K] = rows_cols(x, "cuda_gemv", "x");
    FM_ARG(w.ndim() == 2, "cuda_gemv: w must be 2-D (N rows), got shape ", shape_of(w));
    const size_t N = w.shape(0);
    FM_ARG(T <= size_t(cuda::kMaxGemvTokens), "cuda_gemv: x must have at most ", cuda::kMaxGemvTokens,
           " rows (T, tokens), got shape ", shape_of(x));
    FM_ARG(N < (size_t(1) << 31) && K < (size_t(1) << 31), "cuda_gemv: w or x too large");
    cuda::check_gemv(f, int(T), int(N), int(K));  // T, N >= 1; K a multiple of the block
    const FormatTraits& t = format_traits(f);
    const size_t row_bytes = format_row_bytes(f, int64_t(K));
    FM_ARG(w.shape(1) * w.itemsize() == row_bytes, "cuda_gemv: w's rows must be ", row_bytes, " bytes (K = ", K, " ",
           t.name, " weights), got shape ", shape_of(w), " of ", w.itemsize(), "-byte items");
    auto y = x.ndim() == 2 ? numpy_owned<float>({T, N}) : numpy_owned<float>({N});
    {
        nb::gil_scoped_release nogil;
        if (emulate) cuda::gemv_emulated(f, y.data(), f32_data(x), w.data(), int(T), int(N), int(K));
        else cuda::gemv(f, y.data(), f32_data(x), w.data(), int(T), int(N), int(K));
    }
    return y;
}

// q (B, n_heads, hd) f32; k, v (B, rows, n_kv_heads * hd) f32 or f16; lengths (B) int32.
struct AttentionArgs {
    int B, rows, n_heads, n_kv_heads, hd;
    DType dt;
    float scale;
};
AttentionArgs attention_args(const AnyArray& q, const AnyArray& k, const AnyArray& v, const I32Vector& lengths,
                             std::optional<float> scale, const char* fn) {
    FM_ARG(is_f32(q) && q.ndim() == 3, fn, ": q must be float32 (B, n_heads, head_dim), got shape ", shape_of(q));
    const size_t B = q.shape(0), n_heads = q.shape(1), hd = q.shape(2);
    FM_ARG(k.ndim() == 3 && k.shape(0) == B && (is_f32(k) || is_f16(k)), fn,
           ": k must be (B, rows, n_kv_heads * head_dim) float32 or float16 with B = ", B, ", got shape ", shape_of(k));
    FM_ARG(v.ndim() == 3 && v.shape(0) == k.shape(0) && v.shape(1) == k.shape(1) && v.shape(2) == k.shape(2) &&
               v.dtype() == k.dtype(),
           fn, ": v must have k's shape ", shape_of(k), " and dtype, got shape ", shape_of(v));
    FM_ARG(hd > 0 && k.shape(2) % hd == 0 && k.shape(2) > 0, fn, ": k's rows (", k.shape(2),
           ") must be a positive multiple of head_dim (", hd, ")");
    FM_ARG(lengths.shape(0) == B, fn, ": lengths must be int32 (B,) with B = ", B, ", got ", lengths.shape(0));
    FM_ARG(B < 65536 && n_heads < 65536 && k.shape(1) < (size_t(1) << 31), fn, ": too large");
    const float s = scale ? *scale : 1.0f / std::sqrt(float(hd));  // checked with the rest (checks.h)
    return {int(B), int(k.shape(1)), int(n_heads), int(k.shape(2) / hd), int(hd), is_f32(k) ? DType::F32 : DType::F16,
            s};
}

}  // namespace

void bind_cuda(nb::module_& m) {
    m.def("cuda_built", &cuda::built, "True when the module was compiled with nvcc (the CUDA kernels are in it)");
    m.def(
        "cuda_gemv",
        [](AnyArray x, AnyArray w, const std::string& format) { return py_gemv(x, w, format, false); }, "x"_a, "w"_a,
        "format"_a,
        "y (T, N) = x (T, K) w^T on the GPU, T <= 8; w (N, row bytes) uint8 in a block format (as quantize "
        "returns), or (N, K) f32 / f16 / bf16 (uint16 bits). x (K,) gives y (N,).");
    m.def(
        "cuda_gemv_emulated",
        [](AnyArray x, AnyArray w, const std::string& format) { return py_gemv(x, w, format, true); }, "x"_a, "w"_a,
        "format"_a, "cuda_gemv's kernel code run on the CPU, lane by lane (kernels/cuda/gemv_lanes.h)");
    m.def(
        "cuda_gemv_f16",
        [](CF32Array x, nb::ndarray<const uint16_t, nb::c_contig, nb::device::cpu> w) {
            FM_ARG(w.ndim() == 2 && x.ndim() == 1 && x.shape(0) == w.shape(1),
                   "cuda_gemv_f16: x must be (K,) with K = w.shape[1]");
            auto y = numpy_owned<float>({size_t(w.shape(0))});
            nb::gil_scoped_release nogil;
            cuda::gemv_f16(y.data(), x.data(), w.data(), int(w.shape(0)), int(w.shape(1)));
            return y;
        },
        "x"_a, "w"_a, "y = W x on the GPU (W f16 bits as uint16); for tests");
    auto rmsnorm = [](AnyArray x, AnyArray w, float eps, bool reference) {
        const char* fn = reference ? "rmsnorm_ref" : "cuda_rmsnorm";
        const auto [rows, d] = rows_cols(x, fn, "x");
        FM_ARG(is_f32(w) && w.ndim() == 1 && w.shape(0) == d, fn, ": w must be float32 (d,) with d = ", d,
               " (x's row width), got shape ", shape_of(w));
        FM_ARG(rows > 0 && d > 0 && rows < (size_t(1) << 31) && d < (size_t(1) << 31), fn, ": x must not be empty");
        auto y = like(x, rows, d);
        nb::gil_scoped_release nogil;
        if (reference)
            for (size_t r = 0; r < rows; ++r) fm::rmsnorm(y.data() + r * d, f32_data(x) + r * d, f32_data(w), int(d), eps);
        else
            cuda::rmsnorm(y.data(), f32_data(x), f32_data(w), int(rows), int(d), eps);
        return y;
    };
    m.def(
        "cuda_rmsnorm", [=](AnyArray x, AnyArray w, float eps) { return rmsnorm(x, w, eps, false); }, "x"_a, "w"_a,
        "eps"_a = 1e-6f, "Each row of x (rows, d) / sqrt(mean(row^2) + eps) * w, on the GPU");
    m.def(
        "rmsnorm_ref", [=](AnyArray x, AnyArray w, float eps) { return rmsnorm(x, w, eps, true); }, "x"_a, "w"_a,
        "eps"_a = 1e-6f, "cuda_rmsnorm's CPU reference: fm::rmsnorm (kernels/cpu/ops.h) per row");
    m.def(
        "cuda_add",
        [](AnyArray x, AnyArray y) {
            const auto [rows, cols] = rows_cols(x, "cuda_add", "x");
            FM_ARG(is_f32(y) && y.ndim() == x.ndim() && y.size() == x.size(), "cuda_add: y must be float32 of x's shape ",
                   shape_of(x), ", got ", shape_of(y));
            auto out = like(x, rows, cols);
            std::copy(f32_data(x), f32_data(x) + x.size(), out.data());
            nb::gil_scoped_release nogil;
            cuda::add(out.data(), f32_data(y), out.size());
            return out;
        },
        "x"_a, "y"_a, "x + y on the GPU (the residual add)");
    auto rope = [](AnyArray v, int n_heads, int head_dim, AnyArray cos, AnyArray sin, bool reference) {
        const char* fn = reference ? "rope_ref" : "cuda_rope";
        FM_ARG(is_f32(v) && v.ndim() == 2, fn, ": v must be float32 (T, row width), got shape ", shape_of(v));
        const size_t T = v.shape(0), ld = v.shape(1);
        FM_ARG(head_dim >= 2 && head_dim % 2 == 0, fn, ": head_dim must be even and >= 2, got ", head_dim);
        FM_ARG(n_heads >= 1 && size_t(n_heads) * head_dim <= ld, fn, ": n_heads * head_dim (", n_heads, " * ",
               head_dim, ") must be in [1, v's row width ", ld, "]");
        const size_t half = size_t(head_dim / 2);
        for (const auto& [a, name] : {std::make_pair(&cos, "cos"), std::make_pair(&sin, "sin")})
            FM_ARG(is_f32(*a) && a->ndim() == 2 && a->shape(0) == T && a->shape(1) == half, fn, ": ", name,
                   " must be float32 (T, head_dim / 2) = (", T, ", ", half, "), got shape ", shape_of(*a));
        FM_ARG(T > 0 && T < (size_t(1) << 31), fn, ": v must have rows");
        auto out = numpy_owned<float>({T, ld});
        std::copy(f32_data(v), f32_data(v) + v.size(), out.data());
        nb::gil_scoped_release nogil;
        if (reference)
            for (size_t t = 0; t < T; ++t)
                fm::rope(out.data() + t * ld, n_heads, head_dim, f32_data(cos) + t * half, f32_data(sin) + t * half);
        else
            cuda::rope(out.data(), int(T), ld, n_heads, head_dim, f32_data(cos), f32_data(sin));
        return out;
    };
    m.def(
        "cuda_rope",
        [=](AnyArray v, int n_heads, int head_dim, AnyArray cos, AnyArray sin) {
            return rope(v, n_heads, head_dim, cos, sin, false);
        },
        "v"_a, "n_heads"_a, "head_dim"_a, "cos"_a, "sin"_a,
        "Rotary embedding of the n_heads heads at the start of each row of v (T, width), on the GPU; cos, sin: "
        "(T, head_dim / 2)");
    m.def(
        "rope_ref",
        [=](AnyArray v, int n_heads, int head_dim, AnyArray cos, AnyArray sin) {
            return rope(v, n_heads, head_dim, cos, sin, true);
        },
        "v"_a, "n_heads"_a, "head_dim"_a, "cos"_a, "sin"_a, "cuda_rope's CPU reference: fm::rope per row");
    m.def(
        "cuda_gated",
        [](AnyArray g, AnyArray u, const std::string& activation) {
            const Activation act = activation_of(activation, "cuda_gated");
            const auto [rows, cols] = rows_cols(g, "cuda_gated", "g");
            FM_ARG(is_f32(u) && u.ndim() == g.ndim() && u.size() == g.size(), "cuda_gated: u must be float32 of g's ",
                   "shape ", shape_of(g), ", got ", shape_of(u));
            auto out = like(g, rows, cols);
            nb::gil_scoped_release nogil;
            cuda::gated(act, out.data(), f32_data(g), f32_data(u), out.size());
            return out;
        },
        "g"_a, "u"_a, "activation"_a = "silu", "act(g) * u on the GPU (silu or gelu_tanh)");
    m.def(
        "cuda_attention_decode",
        [](AnyArray q, AnyArray k, AnyArray v, I32Vector lengths, std::optional<float> scale, int chunk) {
            const AttentionArgs a = attention_args(q, k, v, lengths, scale, "cuda_attention_decode");
            auto out = numpy_owned<float>({size_t(a.B), size_t(a.n_heads), size_t(a.hd)});
            nb::gil_scoped_release nogil;
            cuda::attention_decode(out.data(), f32_data(q), k.data(), v.data(), a.dt, lengths.data(), a.B, a.rows,
                                   a.n_heads, a.n_kv_heads, a.hd, a.scale, chunk);
            return out;
        },
        "q"_a, "k"_a, "v"_a, "lengths"_a, "scale"_a = nb::none(), "chunk"_a = 0,
        "Decode GQA attention on the GPU, split over the positions in chunks (0: 256): q (B, n_heads, head_dim); "
        "k, v (B, rows, n_kv_heads * head_dim) float32 or float16; sequence b attends to its rows [0, lengths[b]). "
        "scale None: 1 / sqrt(head_dim).");
    m.def(
        "attention_decode_ref",
        [](AnyArray q, AnyArray k, AnyArray v, I32Vector lengths, std::optional<float> scale) {
            const AttentionArgs a = attention_args(q, k, v, lengths, scale, "attention_decode_ref");
            auto out = numpy_owned<float>({size_t(a.B), size_t(a.n_heads), size_t(a.hd)});
            nb::gil_scoped_release nogil;
            cuda::attention_decode_ref(out.data(), f32_data(q), k.data(), v.data(), a.dt, lengths.data(), a.B,
                                       a.rows, a.n_heads, a.n_kv_heads, a.hd, a.scale);
            return out;
        },
        "q"_a, "k"_a, "v"_a, "lengths"_a, "scale"_a = nb::none(), "cuda_attention_decode's scalar reference, in double");
    m.def(
        "cuda_argmax",
        [](AnyArray logits) {
            const auto [T, vocab] = rows_cols(logits, "cuda_argmax", "logits");
            FM_ARG(vocab > 0 && vocab < (size_t(1) << 31) && T < (size_t(1) << 31),
                   "cuda_argmax: logits must not be empty, got shape ", shape_of(logits));
            auto out = numpy_owned<int32_t>({T});
            nb::gil_scoped_release nogil;
            cuda::argmax(out.data(), f32_data(logits), int(T), int(vocab));
            return out;
        },
        "logits"_a, "Index of each row's largest logit (T,) on the GPU: the greedy sampler's choice (the first of "
        "equals; NaNs skipped unless first)");
}

}  // namespace fm::bindings
