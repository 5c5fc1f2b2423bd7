// The nanobind module flashmem._core: the only file that includes nanobind.
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "core/buffer.h"
#include "io/direct_reader.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "memory/memory_bank.h"
#include "ffn/predictor.h"
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

namespace mem = fm::memory;
using Value = std::tuple<nb::bytes, std::string, int, int>;  // (raw bytes, "f16"|"f32", n_slots, d_value)
using KeyArray = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

mem::Entry make_entry(const std::optional<Value>& value, const std::string& text, const std::string& metadata) {
    mem::Entry e;
    if (value) {
        const auto& [raw, dtype, n_slots, d_value] = *value;
        e.value_dtype = fm::dtype_from_name(dtype);
        e.n_slots = n_slots, e.d_value = d_value;
        const auto* p = static_cast<const uint8_t*>(raw.data());
        e.value.assign(p, p + raw.size());
    }
    e.text = text, e.metadata = metadata;
    return e;
}

void check_width(const mem::MemoryBank& b, size_t width, const char* what) {
    FM_ARG(width == size_t(b.dim()), what, " must have ", b.dim(), " columns (the bank's dim), got ", width);
}

void bind_memory(nb::module_& m) {
    nb::class_<mem::MemoryBank>(m, "MemoryBank")
        .def(nb::init<int, const std::string&, const std::string&, const mem::Params&>(), "dim"_a, "metric"_a,
             "index"_a, "params"_a)
        .def_prop_ro("dim", &mem::MemoryBank::dim)
        .def_prop_ro("metric", &mem::MemoryBank::metric)
        .def_prop_ro("index", &mem::MemoryBank::index_name)
        .def("__len__", &mem::MemoryBank::size)
        .def("contains", &mem::MemoryBank::contains)
        .def("ids", [](const mem::MemoryBank& b) {
            auto v = b.ids();
            auto out = numpy_owned<int64_t>({v.size()});
            std::copy(v.begin(), v.end(), out.data());
            return out;
        })
        .def(
            "add",
            [](mem::MemoryBank& b, KeyArray keys, std::optional<nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig>> ids,
               const std::vector<std::optional<Value>>& values, const std::vector<std::string>& texts,
               const std::vector<std::string>& metadata) {
                const size_t n = keys.shape(0);
                check_width(b, keys.shape(1), "keys");
                FM_ARG(!ids || ids->shape(0) == n, "got ", ids ? ids->shape(0) : 0, " ids for ", n, " keys");
                FM_ARG(values.empty() || values.size() == n, "got ", values.size(), " values for ", n, " keys");
                FM_ARG(texts.empty() || texts.size() == n, "got ", texts.size(), " texts for ", n, " keys");
                FM_ARG(metadata.empty() || metadata.size() == n, "got ", metadata.size(), " metadata for ", n, " keys");
                std::vector<mem::Entry> entries;
                if (!values.empty() || !texts.empty() || !metadata.empty())
                    for (size_t i = 0; i < n; ++i)
                        entries.push_back(make_entry(values.empty() ? std::nullopt : values[i],
                                                     texts.empty() ? "" : texts[i], metadata.empty() ? "" : metadata[i]));
                nb::gil_scoped_release nogil;
                auto out_ids = b.add(keys.data(), n, ids ? ids->data() : nullptr, std::move(entries));
                nb::gil_scoped_acquire gil;
                auto out = numpy_owned<int64_t>({n});
                std::copy(out_ids.begin(), out_ids.end(), out.data());
                return out;
            },
            "keys"_a, "ids"_a.none(), "values"_a, "texts"_a, "metadata"_a)
        .def("get",
             [](const mem::MemoryBank& b, int64_t id) {
                 auto key = numpy_owned<float>({size_t(b.dim())});
                 mem::Entry e = b.get(id, key.data());
                 return nb::make_tuple(key, nb::bytes(e.value.data(), e.value.size()),
                                       std::string(fm::dtype_name(e.value_dtype)), e.n_slots, e.d_value, e.text,
                                       e.metadata, e.created, e.updated);
             })
        .def(
            "update",
            [](mem::MemoryBank& b, int64_t id, std::optional<nb::ndarray<const float, nb::ndim<1>, nb::c_contig>> key,
               std::optional<Value> value, std::optional<std::string> text, std::optional<std::string> metadata) {
                if (key) check_width(b, key->shape(0), "key");
                std::optional<mem::Entry> v;
                if (value) v = make_entry(value, "", "");
                b.update(id, key ? key->data() : nullptr, v ? &*v : nullptr, text ? &*text : nullptr,
                         metadata ? &*metadata : nullptr);
            },
            "id"_a, "key"_a.none(), "value"_a.none(), "text"_a.none(), "metadata"_a.none())
        .def("remove", [](mem::MemoryBank& b, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig> ids) {
            b.remove(ids.data(), ids.shape(0));
        })
        .def(
            "replace",
            [](mem::MemoryBank& b, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig> ids,
               nb::ndarray<const float, nb::ndim<1>, nb::c_contig> key, std::optional<int64_t> new_id,
               std::optional<Value> value, const std::string& text, const std::string& metadata) {
                check_width(b, key.shape(0), "key");
                return b.replace(ids.data(), ids.shape(0), key.data(), new_id, make_entry(value, text, metadata));
            },
            "ids"_a, "key"_a, "new_id"_a.none(), "value"_a.none(), "text"_a, "metadata"_a)
        .def(
            "search",
            [](const mem::MemoryBank& b, KeyArray queries, int k,
               std::optional<nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig>> allow) {
                check_width(b, queries.shape(1), "queries");
                FM_ARG(k > 0, "k must be positive, got ", k);
                const size_t nq = queries.shape(0);
                auto ids = numpy_owned<int64_t>({nq, size_t(k)});
                auto scores = numpy_owned<float>({nq, size_t(k)});
                std::optional<std::vector<int64_t>> allowed;
                if (allow) allowed.emplace(allow->data(), allow->data() + allow->shape(0));
                {
                    nb::gil_scoped_release nogil;
                    b.search(queries.data(), nq, k, allowed ? &*allowed : nullptr, ids.data(), scores.data());
                }
                return nb::make_tuple(ids, scores);
            },
            "queries"_a, "k"_a, "allow"_a.none())
        .def("metadata_all", &mem::MemoryBank::metadata_all, "(id, metadata JSON) of every entry")
        .def("set_param", &mem::MemoryBank::set_param, nb::call_guard<nb::gil_scoped_release>())
        .def("get_param", &mem::MemoryBank::get_param)
        .def_prop_ro("memory_bytes", &mem::MemoryBank::memory_bytes)
        .def("save", &mem::MemoryBank::save, "path"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_static("load", &mem::MemoryBank::load, "path"_a, "mmap"_a = false,
                    nb::call_guard<nb::gil_scoped_release>());
    m.def("bank_checksum", [](nb::bytes b) {
        return mem::checksum64(static_cast<const uint8_t*>(b.data()), b.size());
    }, "The checksum memory-bank files carry over their payload (for tests that craft files).");
}

}  // namespace

NB_MODULE(_core, m) {
    bind_memory(m);
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
           std::optional<nb::ndarray<const int64_t, nb::c_contig, nb::device::cpu>> rows, bool reference,
           const std::string& isa) {
            fm::DType dt = weight_dtype(b, dtype);
            const int D = int(x.size()), n = int(b.shape(0));
            FM_ARG(b.ndim() == 2, "bundles must be 2-D");
            FM_ARG(b.shape(1) >= size_t(3 * D), "bundles must be (n, >= 3*D) with D = len(x)");
            FM_ARG(y0.size() == size_t(D), "y must have length D");
            auto y = numpy_owned<float>({size_t(D)});
            std::copy(y0.data(), y0.data() + D, y.data());
            FM_ARG(!rows || rows->size() == 0 || rows->ndim() == 1, "rows must be 1-D");
            std::vector<const void*> ptrs;  // gathered rows (any order, repeats allowed), or all rows
            const size_t row = b.shape(1) * fm::dtype_size(dt);
            if (rows) {
                for (size_t j = 0; j < rows->size(); ++j) {
                    const int64_t i = rows->data()[j];
                    FM_ARG(i >= 0 && i < n, "row ", i, " out of range [0, ", n, ")");
                    ptrs.push_back(static_cast<const char*>(b.data()) + i * row);
                }
            } else {
                for (int i = 0; i < n; ++i) ptrs.push_back(static_cast<const char*>(b.data()) + i * row);
            }
            if (reference) fm::ffn_decode_ref(y.data(), x.data(), ptrs.data(), dt, D, int(ptrs.size()));
            else pick_isa(isa)->ffn_decode[int(dt)](y.data(), x.data(), ptrs.data(), D, int(ptrs.size()));
            return y;
        },
        "y"_a, "x"_a, "bundles"_a, "dtype"_a, "rows"_a = nb::none(), "reference"_a = false, "isa"_a = "best",
        "y + SwiGLU FFN of x over neuron bundles [gate | up | down | pad] (all, or the gathered `rows`)");
    m.def(
        "disk_random_read",
        [](const std::string& path, size_t request_bytes, int n_requests, int queue_depth, uint64_t seed) {
            // raw random-read bandwidth of the device under `path`, through the engine's own reader
            FM_ARG(request_bytes % fm::kIoAlign == 0 && request_bytes > 0 && n_requests > 0,
                   "request_bytes must be a positive multiple of ", fm::kIoAlign);
            fm::DirectReader r(path, queue_depth);
            const uint64_t blocks = r.size() / fm::kIoAlign, per = request_bytes / fm::kIoAlign;
            FM_ARG(blocks > per, "'", path, "' is smaller than one request");
            fm::Buffer buf(request_bytes * size_t(n_requests), fm::kIoAlign);
            std::vector<fm::ReadRequest> reqs;
            uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
            for (int i = 0; i < n_requests; ++i) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                reqs.push_back({(x >> 11) % (blocks - per) * fm::kIoAlign, request_bytes,
                                buf.data<char>() + size_t(i) * request_bytes});
            }
            nb::gil_scoped_release nogil;
            r.read(reqs);
            return std::make_pair(r.stats().seconds, r.direct());
        },
        "path"_a, "request_bytes"_a, "n_requests"_a, "queue_depth"_a = 32, "seed"_a = 1,
        "Seconds to read n_requests random aligned requests of request_bytes with direct I/O; (seconds, direct).");
    m.def(
        "bit_sum",
        [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> bits, CF32Array z, bool reference,
           const std::string& isa) {
            const int n = int(z.size());
            FM_ARG(bits.shape(0) >= size_t((n + 7) / 8), "bits must hold at least ceil(len(z)/8) bytes");
            return reference ? fm::bit_sum_ref(bits.data(), z.data(), n) : pick_isa(isa)->bit_sum(bits.data(), z.data(), n);
        },
        "bits"_a, "z"_a, "reference"_a = false, "isa"_a = "best", "sum of z[k] where bit k of the packed bits is set");
    m.def(
        "predictor_scores_ref",
        [](nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> gs,
           nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> us, CF32Array gr, CF32Array ur,
           CF32Array gc, CF32Array uc, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> od,
           nb::ndarray<const int8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> ow, CF32Array os, CF32Array x) {
            const int D = int(x.size()), n = int(gs.shape(0)), M = int(od.shape(0));
            FM_ARG(gs.shape(1) == size_t((D + 7) / 8) && us.shape(0) == gs.shape(0) && us.shape(1) == gs.shape(1) &&
                       gr.size() == size_t(n) && ur.size() == size_t(n) && gc.size() == size_t(D) && uc.size() == size_t(D) &&
                       ow.shape(0) == size_t(n) && ow.shape(1) == size_t(2 * M) && os.size() == size_t(2 * M),
                   "predictor tensors do not match");
            for (int j = 0; j < M; ++j) FM_ARG(od.data()[j] >= 0 && od.data()[j] < D, "outlier dim out of range");
            auto out = numpy_owned<float>({size_t(n)});
            fm::predictor_scores_ref({gs.data(), us.data(), gr.data(), ur.data(), gc.data(), uc.data(), od.data(), ow.data(),
                                      os.data(), M},
                                     x.data(), D, n, out.data());
            return out;
        },
        "gate_sign"_a, "up_sign"_a, "gate_row"_a, "up_row"_a, "gate_col"_a, "up_col"_a, "outlier_dims"_a,
        "outlier_weight"_a, "outlier_scale"_a, "x"_a,
        "Scalar reference of the sparsity predictor's scores for one token.");
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
        .def_prop_ro("owned_bytes", &fm::Model::owned_bytes, "every byte this engine owns")
        .def_prop_ro("expected_weight_bytes", [](const fm::Model& m) { return m.expected_weight_bytes(true); })
        .def(
            "configure_sparse",
            [](fm::Model& self, const std::string& source, double sparsity, int window, bool use_window,
               size_t budget, bool with_predictor, std::optional<std::string> path,
               std::vector<std::vector<uint64_t>> piece_base, std::vector<uint64_t> piece_stride,
               std::vector<uint64_t> piece_bytes, int queue_depth, int coalesce_gap, bool direct, int cache_rows,
               int staging_rows, double cache_bias, bool expire_window, const std::string& eviction) {
                FM_ARG(source == "dram" || source == "flash", "source must be 'dram' or 'flash', got '", source, "'");
                FM_ARG(eviction == "lru" || eviction == "hot", "eviction must be 'lru' or 'hot', got '", eviction, "'");
                fm::SparseOptions o;
                o.hot = eviction == "hot";
                o.sparsity = sparsity, o.window = window, o.use_window = use_window, o.queue_depth = queue_depth;
                o.coalesce_gap = coalesce_gap, o.direct = direct, o.cache_rows = cache_rows;
                o.staging_rows = staging_rows, o.cache_bias = cache_bias, o.expire = expire_window;
                fm::FileLayout layout;
                if (source == "flash") {
                    FM_ARG(path && !piece_base.empty() && piece_stride.size() == piece_bytes.size() &&
                               !piece_stride.empty() && piece_stride.size() <= 3,
                           "flash source needs the bundle file and its layout");
                    layout.path = *path, layout.n_pieces = int(piece_stride.size());
                    layout.piece_base = piece_base, layout.piece_stride = piece_stride, layout.piece_bytes = piece_bytes;
                }
                self.configure_sparse(source == "flash" ? fm::SparseFfn::Source::Flash : fm::SparseFfn::Source::Resident,
                                      o, source == "flash" ? &layout : nullptr, budget, with_predictor);
            },
            "source"_a, "sparsity"_a, "window"_a, "use_window"_a, "budget"_a, "with_predictor"_a, "path"_a = nb::none(),
            "piece_base"_a = std::vector<std::vector<uint64_t>>{}, "piece_stride"_a = std::vector<uint64_t>{},
            "piece_bytes"_a = std::vector<uint64_t>{}, "queue_depth"_a = 32, "coalesce_gap"_a = 2, "direct"_a = true,
            "cache_rows"_a = -1, "staging_rows"_a = 0, "cache_bias"_a = 0.0, "expire_window"_a = false,
            "eviction"_a = "lru")
        .def(
            "sparse_stats",
            [](fm::Model& self) {
                nb::dict d;
                fm::SparseFfn* sp = self.sparse();
                if (!sp) return d;
                const fm::SparseStats& s = sp->stats();
                d["steps"] = s.steps, d["tokens"] = s.tokens, d["selected"] = s.selected, d["computed"] = s.computed;
                d["hits"] = s.hits, d["misses"] = s.misses;
                d["select_s"] = s.select_s, d["io_s"] = s.io_s, d["compute_s"] = s.compute_s;
                const fm::IoStats* io = sp->io_stats();
                d["bytes_read"] = io ? io->bytes : 0;
                d["requests"] = io ? io->requests : 0;
                d["read_batches"] = io ? io->batches : 0;
                d["read_s"] = io ? io->seconds : 0.0;
                d["direct_io"] = sp->direct();
                d["cache_rows"] = sp->options().cache_rows;
                d["minimum_budget"] = self.minimum_budget();
                d["staging_rows"] = sp->options().staging_rows;
                d["predictor_bytes"] = sp->predictor().bytes();
                d["sparse_bytes"] = sp->bytes();
                size_t cached = 0;
                for (int l = 0; l < self.config().n_layers; ++l) cached += sp->cached(l);
                d["cached_neurons"] = cached;
                return d;
            },
            "Counters of the sparse FFN since the last reset_sparse_stats().")
        .def(
            "predictor_scores",
            [](fm::Model& self, int layer, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> x) {
                FM_ARG(int(x.shape(1)) == self.config().dim, "x must be (T, d_model)");
                auto out = numpy_owned<float>({x.shape(0), size_t(self.config().hidden_dim)});
                self.predictor_scores(layer, x.data(), int(x.shape(0)), out.data());
                return out;
            },
            "layer"_a, "x"_a)
        .def("reset_sparse_stats", [](fm::Model& self) { if (self.sparse()) self.sparse()->reset_stats(); })
        .def("clear_neuron_cache", [](fm::Model& self) { if (self.sparse()) self.sparse()->clear_cache(); })
        .def(
            "set_trace",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu> ids) {
                FM_ARG(self.sparse(), "set_trace needs the sparse FFN");
                self.sparse()->set_trace(std::vector<int32_t>(ids.data(), ids.data() + ids.size()), int(ids.shape(0)),
                                         int(ids.shape(2)));
            },
            "ids"_a, "Replays fixed neuron selections (n_steps, n_layers, k) instead of the predictor.")
        .def(
            "ffn_inputs",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens) {
                const int T = int(tokens.shape(0));
                const fm::Config& c = self.config();
                auto out = numpy_owned<float>({size_t(c.n_layers), size_t(T), size_t(c.dim)});
                nb::gil_scoped_release nogil;
                self.ffn_inputs(tokens.data(), T, out.data());
                return out;
            },
            "tokens"_a, "FFN inputs (after the FFN norm) of every layer, (n_layers, T, d_model), from position 0.")
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
            "forward_inputs",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> src,
               std::optional<nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>> embeds,
               int start_pos, bool all_logits) {
                const int T = int(src.shape(0));
                int n_embeds = 0;
                const float* e = nullptr;
                if (embeds && embeds->shape(0)) {
                    FM_ARG(int(embeds->shape(1)) == self.config().dim, "inputs_embeds must have width ",
                           self.config().dim, " (d_model), got ", embeds->shape(1));
                    n_embeds = int(embeds->shape(0)), e = embeds->data();
                }
                const size_t V = self.config().vocab_size;
                auto out = numpy_owned<float>(all_logits ? std::vector<size_t>{size_t(T), V} : std::vector<size_t>{V});
                nb::gil_scoped_release nogil;
                self.forward_inputs(src.data(), T, e, n_embeds, start_pos, out.data(), all_logits);
                return out;
            },
            "src"_a, "embeds"_a.none(), "start_pos"_a, "all_logits"_a = false,
            "Runs mixed inputs: src[t] >= 0 is a token id, src[t] < 0 is row -src[t]-1 of embeds (n, d_model).")
        .def(
            "hidden_states",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens,
               int start_pos) {
                const int T = int(tokens.shape(0));
                auto out = numpy_owned<float>({size_t(T), size_t(self.config().dim)});
                nb::gil_scoped_release nogil;
                self.hidden_states(tokens.data(), T, start_pos, out.data());
                return out;
            },
            "tokens"_a, "start_pos"_a = 0, "Final hidden states (after the final norm), (T, d_model).")
        .def(
            "embed",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens) {
                auto out = numpy_owned<float>({tokens.shape(0), size_t(self.config().dim)});
                self.embed(tokens.data(), int(tokens.shape(0)), out.data());
                return out;
            },
            "tokens"_a, "Input embeddings (T, d_model) of token ids.");
}
