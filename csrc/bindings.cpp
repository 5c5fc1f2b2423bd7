// The nanobind module flashmem._core: the only file that includes nanobind.
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "core/buffer.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "model/decoder.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using F32Array = nb::ndarray<float, nb::numpy, nb::c_contig>;
using CF32Array = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

template <typename T>
nb::ndarray<nb::numpy, T> numpy_owned(std::vector<size_t> shape) {
    size_t n = 1;
    for (auto s : shape) n *= s;
    T* data = new T[n]();
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

fm::DType weight_dtype(const nb::ndarray<nb::c_contig, nb::device::cpu>& w, const std::string& dtype) {
    fm::DType dt = fm::dtype_from_name(dtype);
    FM_ARG(w.ndim() == 2, "W must be 2-D, got ", w.ndim(), " dimensions");
    FM_ARG(w.itemsize() == fm::dtype_size(dt), "W has ", w.itemsize(), "-byte items but dtype ", dtype,
           " needs ", fm::dtype_size(dt));
    return dt;
}

const fm::Kernels* pick_isa(const std::string& isa) {
    const fm::Kernels* k = isa == "avx2" ? fm::kernels_avx2() : &fm::kernels();
    FM_ARG(k != nullptr, "ISA ", isa, " not available on this CPU");
    return k;
}

// Kernel entry points for tests: the dispatched SIMD kernel or its scalar reference.
nb::ndarray<nb::numpy, float> py_gemm(CF32Array x, nb::ndarray<nb::c_contig, nb::device::cpu> w, const std::string& dtype,
                                      bool reference, const std::string& isa) {
    fm::DType dt = weight_dtype(w, dtype);
    FM_ARG(x.ndim() == 2 && x.shape(1) == w.shape(1), "x must be (T, K) with K = W.shape[1] = ", w.shape(1));
    const int T = int(x.shape(0)), K = int(w.shape(1)), N = int(w.shape(0));
    auto y = numpy_owned<float>({size_t(T), size_t(N)});
    if (reference) {
        fm::gemm_ref(y.data(), N, x.data(), K, T, w.data(), dt, K, K, N);
    } else {
        const fm::Kernels* k = pick_isa(isa);
        std::vector<float> scratch(fm::scratch_floats(K));
        nb::gil_scoped_release nogil;
        k->gemm[int(dt)](y.data(), N, x.data(), K, T, w.data(), K, K, N, scratch.data());
    }
    return y;
}

nb::ndarray<nb::numpy, float> py_accumulate(CF32Array y0, CF32Array a, nb::ndarray<nb::c_contig, nb::device::cpu> b,
                                            const std::string& dtype, bool reference, const std::string& isa) {
    fm::DType dt = weight_dtype(b, dtype);
    FM_ARG(a.ndim() == 2 && a.shape(1) == b.shape(0), "A must be (T, NB) with NB = B.shape[0]");
    FM_ARG(y0.ndim() == 2 && y0.shape(0) == a.shape(0) && y0.shape(1) == b.shape(1), "Y must be (T, D)");
    const int T = int(a.shape(0)), NB = int(b.shape(0)), D = int(b.shape(1));
    auto y = numpy_owned<float>({size_t(T), size_t(D)});
    std::copy(y0.data(), y0.data() + size_t(T) * D, y.data());
    if (reference) {
        fm::accumulate_ref(y.data(), D, a.data(), NB, T, b.data(), dt, D, D, NB);
    } else {
        const fm::Kernels* k = pick_isa(isa);
        std::vector<float> scratch(fm::scratch_floats(D));
        nb::gil_scoped_release nogil;
        k->accumulate[int(dt)](y.data(), D, a.data(), NB, T, b.data(), D, D, NB, scratch.data());
    }
    return y;
}

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "flashmem native core";
    m.def("isa", [] { return std::string(fm::kernels().isa); }, "SIMD instruction set the kernels use");
    m.def("owned_bytes", [] { return size_t(fm::owned_bytes()); }, "bytes held by all native buffers");
    m.def("gemm", &py_gemm, "x"_a, "w"_a, "dtype"_a, "reference"_a = false, "isa"_a = "best");
    m.def("accumulate", &py_accumulate, "y"_a, "a"_a, "b"_a, "dtype"_a, "reference"_a = false, "isa"_a = "best");
    m.def(
        "softmax",
        [](CF32Array x, float scale, bool reference, const std::string& isa) {
            auto y = numpy_owned<float>({x.size()});
            std::copy(x.data(), x.data() + x.size(), y.data());
            if (reference) {
                fm::softmax_ref(y.data(), int(x.size()), scale);
            } else {
                const fm::Kernels* k = pick_isa(isa);
                k->softmax(y.data(), int(x.size()), scale);
            }
            return y;
        },
        "x"_a, "scale"_a = 1.0f, "reference"_a = false, "isa"_a = "best", "softmax(scale * x) of a 1-D array");
    m.def(
        "ffn_decode",
        [](CF32Array y0, CF32Array x, nb::ndarray<nb::c_contig, nb::device::cpu> b, const std::string& dtype,
           bool reference, const std::string& isa) {
            fm::DType dt = weight_dtype(b, dtype);
            const int D = int(x.size()), n = int(b.shape(0));
            FM_ARG(b.shape(1) >= size_t(3 * D), "bundles must be (n, >= 3*D) with D = len(x)");
            FM_ARG(y0.size() == size_t(D), "y must have length D");
            auto y = numpy_owned<float>({size_t(D)});
            std::copy(y0.data(), y0.data() + D, y.data());
            if (reference) fm::ffn_decode_ref(y.data(), x.data(), b.data(), dt, b.shape(1), D, n);
            else pick_isa(isa)->ffn_decode[int(dt)](y.data(), x.data(), b.data(), b.shape(1), D, n);
            return y;
        },
        "y"_a, "x"_a, "bundles"_a, "dtype"_a, "reference"_a = false, "isa"_a = "best",
        "y + SwiGLU FFN of x over neuron bundles [gate | up | down | pad]");
    m.def("cuda_available", &fm::cuda::available, "True when built with CUDA and a GPU is visible");
    m.def("cuda_gemv_f16", [](CF32Array x, nb::ndarray<const uint16_t, nb::c_contig, nb::device::cpu> w) {
        FM_ARG(w.ndim() == 2 && x.ndim() == 1 && x.shape(0) == w.shape(1), "x must be (K,) with K = W.shape[1]");
        auto y = numpy_owned<float>({size_t(w.shape(0))});
        fm::cuda::gemv_f16(y.data(), x.data(), w.data(), int(w.shape(0)), int(w.shape(1)));
        return y;
    }, "x"_a, "w"_a, "y = W x on the GPU (W f16 bits as uint16); for tests");

    nb::class_<fm::Config>(m, "Config")
        .def(nb::init<>())
        .def_rw("vocab_size", &fm::Config::vocab_size)
        .def_rw("dim", &fm::Config::dim)
        .def_rw("hidden_dim", &fm::Config::hidden_dim)
        .def_rw("n_layers", &fm::Config::n_layers)
        .def_rw("n_heads", &fm::Config::n_heads)
        .def_rw("n_kv_heads", &fm::Config::n_kv_heads)
        .def_rw("head_dim", &fm::Config::head_dim)
        .def_rw("max_context", &fm::Config::max_context)
        .def_rw("norm_eps", &fm::Config::norm_eps)
        .def_rw("tied_embeddings", &fm::Config::tied_embeddings)
        .def_rw("qkv_bias", &fm::Config::qkv_bias)
        .def_rw("rope_inv_freq", &fm::Config::rope_inv_freq)
        .def_rw("rope_attention_scaling", &fm::Config::rope_attention_scaling)
        .def_prop_rw(
            "dtype", [](const fm::Config& c) { return std::string(fm::dtype_name(c.dtype)); },
            [](fm::Config& c, const std::string& s) { c.dtype = fm::dtype_from_name(s); });

    nb::class_<fm::Model>(m, "Model")
        .def(nb::init<fm::Config, int>(), "config"_a, "threads"_a)
        .def_prop_ro("n_threads", &fm::Model::n_threads)
        .def_prop_ro("n_cached", &fm::Model::n_cached, "positions held in the KV cache")
        .def_prop_ro("weight_bytes", &fm::Model::weight_bytes)
        .def_prop_ro("state_bytes", &fm::Model::state_bytes)
        .def("load_tensor", &fm::Model::load_tensor, "kind"_a, "layer"_a, "path"_a, "offset"_a, "dtype"_a, "shape"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("check_loaded", &fm::Model::check_loaded)
        .def(
            "profile",
            [](const fm::Model& self) {
                nb::dict d;
                const fm::Profile& p = self.profile();
                for (int i = 0; i < fm::Profile::kParts; ++i) d[fm::Profile::kNames[i]] = p.seconds[i];
                d["tokens"] = p.tokens;
                return d;
            },
            "Seconds spent per part of the forward pass since the last reset_profile().")
        .def("reset_profile", &fm::Model::reset_profile)
        .def(
            "forward",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens,
               int start_pos, bool all_logits) {
                const int T = int(tokens.shape(0));
                const size_t V = self.config().vocab_size;
                auto out = numpy_owned<float>(all_logits ? std::vector<size_t>{size_t(T), V} : std::vector<size_t>{V});
                nb::gil_scoped_release nogil;
                self.forward_tokens(tokens.data(), T, start_pos, out.data(), all_logits);
                return out;
            },
            "tokens"_a, "start_pos"_a, "all_logits"_a = false,
            "Runs tokens at positions [start_pos, start_pos+T); returns logits of the last (or every) token.")
        .def(
            "forward_embeds",
            [](fm::Model& self, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> embeds,
               int start_pos, bool all_logits) {
                const int T = int(embeds.shape(0));
                FM_ARG(int(embeds.shape(1)) == self.config().dim, "inputs_embeds must have width ",
                       self.config().dim, " (d_model), got ", embeds.shape(1));
                const size_t V = self.config().vocab_size;
                auto out = numpy_owned<float>(all_logits ? std::vector<size_t>{size_t(T), V} : std::vector<size_t>{V});
                nb::gil_scoped_release nogil;
                self.forward_embeds(embeds.data(), T, start_pos, out.data(), all_logits);
                return out;
            },
            "embeds"_a, "start_pos"_a, "all_logits"_a = false)
        .def(
            "embed",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens) {
                auto out = numpy_owned<float>({tokens.shape(0), size_t(self.config().dim)});
                self.embed(tokens.data(), int(tokens.shape(0)), out.data());
                return out;
            },
            "tokens"_a, "Input embeddings (T, d_model) of token ids.");
}
