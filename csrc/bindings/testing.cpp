// Entry points for tests and benchmarks: each SIMD kernel (the best ISA or a named one) beside its
// scalar reference, the predictor's reference scores, and the disk's raw random-read bandwidth
// through the engine's own reader (the CUDA kernels: cuda.cpp).
#include <cstring>
#include <atomic>
#include <chrono>
#include <thread>

#include "bindings/common.h"
#include "core/buffer.h"
#include "core/thread_pool.h"
#include "ffn/bundled_ffn.h"
#include "ffn/predictor.h"
#include "io/direct_reader.h"
#include "kernels/cpu/kernels.h"
#include "kernels/quant/quant.h"

namespace fm::bindings {

using namespace nb::literals;

namespace {

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

using U8Matrix = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// The block-format kernel table named: best, avx2 or avx512.
const quant::QuantKernels& pick_quant_isa(const std::string& isa) {
    const quant::QuantKernels* k = quant::quant_kernels_for(isa);
    FM_ARG(k != nullptr, "ISA ", isa, " not available on this CPU");
    return *k;
}

// Activation blocks of x (T, K) as bytes (T, K/32 blocks of 8- or 16-bit activations), from the
// kernel or its reference.
template <typename Q>
nb::ndarray<nb::numpy, uint8_t> quantize_act_as(const float* x, int T, int K, bool reference, const std::string& isa) {
    using Block = quant::ActBlockOf<Q>;
    const size_t row = size_t(K / quant::kActBlock) * sizeof(Block);
    auto out = numpy_owned<uint8_t>({size_t(T), row});
    const quant::QuantKernels& qk = pick_quant_isa(isa);
    for (int t = 0; t < T; ++t) {
        auto* dst = reinterpret_cast<Block*>(out.data() + t * row);
        if (reference) quant::quantize_act_ref(x + size_t(t) * K, dst, K);
        else if constexpr (sizeof(Q) == 1) qk.quantize_act(x + size_t(t) * K, dst, K);
        else qk.quantize_act16(x + size_t(t) * K, dst, K);
    }
    return out;
}

nb::ndarray<nb::numpy, uint8_t> py_quantize_act(nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> x,
                                                bool reference, int bits, const std::string& isa) {
    const int T = int(x.shape(0)), K = int(x.shape(1));
    FM_ARG(K % quant::kActBlock == 0, "x must have a multiple of ", quant::kActBlock, " columns, got ", K);
    FM_ARG(bits == 8 || bits == 16, "bits must be 8 or 16, got ", bits);
    return bits == 8 ? quantize_act_as<int8_t>(x.data(), T, K, reference, isa)
                     : quantize_act_as<int16_t>(x.data(), T, K, reference, isa);
}

// Y (T, N) = W (N rows of K weights in `format`) times the activation blocks (T, K/32 blocks).
nb::ndarray<nb::numpy, float> py_quant_matmul(U8Matrix act, U8Matrix w, const std::string& format, int K,
                                              bool reference, int bits, bool interleaved, const std::string& isa) {
    const Format f = format_from_name(format);
    FM_ARG(is_block_format(f), "quant_matmul: ", format, " is not a block format");
    FM_ARG(bits == 8 || bits == 16, "bits must be 8 or 16, got ", bits);
    const size_t row_bytes = format_row_bytes(f, K);
    const size_t block = bits == 8 ? sizeof(quant::ActBlock) : sizeof(quant::ActBlock16);
    FM_ARG(K % quant::kActBlock == 0 && act.shape(1) == size_t(K / quant::kActBlock) * block,
           "activations must be (T, K/32 blocks) for K = ", K);
    FM_ARG(w.shape(1) == row_bytes, "W rows must be ", row_bytes, " bytes for ", K, " ", format, " weights, got ",
           w.shape(1));
    const int T = int(act.shape(0)), N = int(w.shape(0));
    auto y = numpy_owned<float>({size_t(T), size_t(N)});
    const quant::QuantKernels& qk = pick_quant_isa(isa);
    if (interleaved) {  // w as repack_x8 left it, through the kernel for that layout
        FM_ARG(!reference && quant::can_repack_x8(f, N) && (bits == 8 ? qk.matmul_x8[int(f)] != nullptr : qk.matmul16_x8[int(f)] != nullptr),
               "quant_matmul: interleaved takes a q4_0 or q4_1 matrix with 8-bit activations, or a q8_0 matrix with ",
               "16-bit ones, of rows a multiple of 8");
        if (bits == 8)
            qk.matmul_x8[int(f)](y.data(), N, reinterpret_cast<const quant::ActBlock*>(act.data()), T, w.data(),
                                 row_bytes, K, N);
        else
            qk.matmul16_x8[int(f)](y.data(), N, reinterpret_cast<const quant::ActBlock16*>(act.data()), T, w.data(),
                                   row_bytes, K, N);
    } else if (bits == 8) {
        const auto* A = reinterpret_cast<const quant::ActBlock*>(act.data());
        if (reference) quant::matmul_ref(f, y.data(), N, A, T, w.data(), row_bytes, K, N);
        else qk.matmul[int(f)](y.data(), N, A, T, w.data(), row_bytes, K, N);
    } else {
        const auto* A = reinterpret_cast<const quant::ActBlock16*>(act.data());
        if (reference) quant::matmul_ref(f, y.data(), N, A, T, w.data(), row_bytes, K, N);
        else qk.matmul16[int(f)](y.data(), N, A, T, w.data(), row_bytes, K, N);
    }
    return y;
}

// Pointers to rows `rows` of w (N, stride bytes), each checked.
std::vector<const void*> row_pointers(U8Matrix w, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> rows,
                                      size_t offset, size_t piece_bytes) {
    FM_ARG(offset + piece_bytes <= w.shape(1), "offset ", offset, " + ", piece_bytes, " bytes passes the rows' ",
           w.shape(1), " bytes");
    std::vector<const void*> ptrs;
    for (size_t j = 0; j < rows.size(); ++j) {
        const int64_t i = rows.data()[j];
        FM_ARG(i >= 0 && i < int64_t(w.shape(0)), "row ", i, " out of range [0, ", w.shape(0), ")");
        ptrs.push_back(w.data() + size_t(i) * w.shape(1));
    }
    return ptrs;
}

}  // namespace

void bind_testing(nb::module_& m) {
    m.def(
        "pool_cover",
        [](size_t n, size_t align, int threads, int jobs, int stall_us, int spin_us) {
            // `jobs` parallel_dynamic jobs over [0, n), alternating with run() jobs, on one pool; a
            // thread other than the caller sleeps stall_us in its first chunk of every job (a
            // descheduled thread); every chunk computes for spin_us (work, on a busy machine). Returns, per index, how many times a chunk covered it, summed
            // over the jobs, the number of chunks whose edges were not multiples of align, and the
            // number of jobs the pool ran with fewer threads than it has.
            auto counts = numpy_owned<int32_t>({n});
            std::vector<std::atomic<int32_t>> c(n);
            std::atomic<int64_t> misaligned{0}, statics{0};
            uint64_t reduced = 0;
            {
                nb::gil_scoped_release nogil;
                fm::ThreadPool pool(threads);
                for (int j = 0; j < jobs; ++j) {
                    std::atomic<bool> stalled{false};
                    pool.parallel_dynamic(n, align, [&](size_t b, size_t e, int tid) {
                        if (tid != 0 && stall_us > 0 && !stalled.exchange(true))
                            std::this_thread::sleep_for(std::chrono::microseconds(stall_us));
                        if (spin_us > 0) {
                            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
                            while (std::chrono::steady_clock::now() < until) {
                            }
                        }
                        if (b % align || (e % align && e != n)) misaligned++;
                        for (size_t i = b; i < e; ++i) c[i]++;
                    });
                    pool.run([&](int, int) { statics++; });
                }
                reduced = pool.reduced_jobs();
            }
            for (size_t i = 0; i < n; ++i) counts.data()[i] = c[i].load();
            FM_ARG(statics.load() == int64_t(jobs) * threads, "run(): ", statics.load(), " calls for ", jobs, " jobs");
            return std::make_tuple(counts, misaligned.load(), reduced);
        },
        "n"_a, "align"_a, "threads"_a, "jobs"_a = 1, "stall_us"_a = 0, "spin_us"_a = 0,
        "ThreadPool::parallel_dynamic's coverage of [0, n): (times each index was covered, misaligned chunks, "
        "jobs run with fewer threads)");
    m.def(
        "quant_dot_ptrs",
        [](U8Matrix act, U8Matrix w, const std::string& format, int K, size_t offset,
           nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> rows, bool reference,
           const std::string& isa) {
            const Format f = format_from_name(format);
            FM_ARG(is_block_format(f), format, " is not a block format");
            FM_ARG(K % quant::kActBlock == 0 && act.shape(0) == 1 &&
                       act.shape(1) == size_t(K / quant::kActBlock) * sizeof(quant::ActBlock),
                   "act must be one token's 8-bit blocks for K = ", K);
            auto ptrs = row_pointers(w, rows, offset, format_row_bytes(f, K));
            const auto* A = reinterpret_cast<const quant::ActBlock*>(act.data());
            auto out = numpy_owned<float>({ptrs.size()});
            if (reference) quant::dot_ptrs_ref(f, out.data(), A, ptrs.data(), offset, K, int(ptrs.size()));
            else pick_quant_isa(isa).dot_ptrs[int(f)](out.data(), A, ptrs.data(), offset, K, int(ptrs.size()));
            return out;
        },
        "act"_a, "w"_a, "format"_a, "K"_a, "offset"_a, "rows"_a, "reference"_a = false, "isa"_a = "best",
        "out[j] = row rows[j] of w (N, stride bytes), from byte `offset`, K weights in `format`, . act");
    m.def(
        "quant_axpy_ptrs",
        [](CF32Array y0, CF32Array c, U8Matrix w, const std::string& format, size_t offset,
           nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> rows, bool reference,
           const std::string& isa) {
            const Format f = format_from_name(format);
            FM_ARG(is_block_format(f), format, " is not a block format");
            const int K = int(y0.size());
            auto ptrs = row_pointers(w, rows, offset, format_row_bytes(f, K));
            FM_ARG(c.size() == ptrs.size(), "c must have one coefficient per row");
            auto y = numpy_owned<float>({size_t(K)});
            std::copy(y0.data(), y0.data() + K, y.data());
            if (reference) quant::axpy_ptrs_ref(f, y.data(), c.data(), ptrs.data(), offset, K, int(ptrs.size()));
            else pick_quant_isa(isa).axpy_ptrs[int(f)](y.data(), c.data(), ptrs.data(), offset, K, int(ptrs.size()));
            return y;
        },
        "y"_a, "c"_a, "w"_a, "format"_a, "offset"_a, "rows"_a, "reference"_a = false, "isa"_a = "best",
        "y + sum_j c[j] * row rows[j] of w (N, stride bytes) from byte `offset`, len(y) weights in `format`");
    m.def(
        "quant_axpy_split",
        [](CF32Array y0, CF32Array c, U8Matrix w, const std::string& format, size_t offset,
           nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> rows,
           nb::ndarray<const uint16_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> scales,
           nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> groups, bool reference,
           const std::string& isa) {
            const Format f = format_from_name(format);
            FM_ARG(BundleFormat::can_split(f), format, " has no split down columns (q4_0, q4_1, q8_0)");
            const int K = int(y0.size());
            FM_ARG(K % 32 == 0, "len(y) must be a multiple of 32, got ", K);
            auto ptrs = row_pointers(w, rows, offset, BundleFormat::split_quant_bytes(f, K));
            FM_ARG(c.size() == ptrs.size() && groups.size() == ptrs.size(), "c and groups need one entry per row");
            FM_ARG(scales.shape(1) == size_t(BundleFormat::split_planes(f)) * K, "scales must have ",
                   BundleFormat::split_planes(f), " * len(y) columns");
            std::vector<const uint16_t*> sp(ptrs.size());
            for (size_t j = 0; j < sp.size(); ++j) {
                FM_ARG(groups(j) >= 0 && size_t(groups(j)) < scales.shape(0), "group ", groups(j), " out of range");
                sp[j] = scales.data() + size_t(groups(j)) * scales.shape(1);
            }
            auto y = numpy_owned<float>({size_t(K)});
            std::copy(y0.data(), y0.data() + K, y.data());
            if (reference)
                quant::axpy_split_ref(f, y.data(), c.data(), ptrs.data(), offset, sp.data(), K, int(ptrs.size()));
            else
                pick_quant_isa(isa).axpy_split[int(f)](y.data(), c.data(), ptrs.data(), offset, sp.data(), K,
                                                       int(ptrs.size()));
            return y;
        },
        "y"_a, "c"_a, "w"_a, "format"_a, "offset"_a, "rows"_a, "scales"_a, "groups"_a, "reference"_a = false,
        "isa"_a = "best",
        "y + sum_j c[j] * split down column rows[j] of w from byte `offset`, its scales row groups[j] of `scales`");
    m.def(
        "dequantize",
        [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> raw, const std::string& format) {
            const Format f = format_from_name(format);
            FM_ARG(is_block_format(f), "dequantize: ", format, " is not a block format");
            const FormatTraits& t = format_traits(f);
            FM_ARG(raw.shape(0) % t.block_bytes == 0, "dequantize: ", raw.shape(0), " bytes are not whole ", t.name,
                   " blocks of ", t.block_bytes, " bytes");
            const size_t n = raw.shape(0) / t.block_bytes * t.block;
            auto y = numpy_owned<float>({n});
            quant::dequantize(f, raw.data(), y.data(), int64_t(n));
            return y;
        },
        "raw"_a, "format"_a, "The weights of whole blocks of a block format (bytes as in a GGUF file), as float32.");
    m.def(
        "to_f16",
        [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> x, bool reference,
           const std::string& isa) {
            auto out = numpy_owned<uint16_t>({x.shape(0)});
            if (reference)
                for (size_t i = 0; i < x.shape(0); ++i) out.data()[i] = f32_to_f16(x.data()[i]);
            else
                pick_isa(isa)->to_f16(out.data(), x.data(), int(x.shape(0)));
            return out;
        },
        "x"_a, "reference"_a = false, "isa"_a = "best", "f16 bits of x, rounded to nearest even (the KV cache's).");
    m.def("quantize_act", &py_quantize_act, "x"_a, "reference"_a = false, "bits"_a = 8, "isa"_a = "best",
          "Activations (T, K) quantized to 8- or 16-bit integer blocks of 32, as bytes (T, K/32 blocks).");
    m.def("quant_matmul", &py_quant_matmul, "act"_a, "w"_a, "format"_a, "K"_a, "reference"_a = false, "bits"_a = 8,
          "interleaved"_a = false, "isa"_a = "best",
          "Y (T, N) = W x for W (N, row bytes) in a block format and quantize_act's blocks (T, ...); interleaved: "
          "W as repack_x8 left it, through the kernel for that layout.");
    m.def(
        "repack_x8",
        [](U8Matrix w, const std::string& format, int K) {
            const Format f = format_from_name(format);
            FM_ARG(quant::can_repack_x8(f, int64_t(w.shape(0))), "repack_x8: a q4_0, q4_1 or q8_0 matrix of rows a multiple ",
                   "of 8, got ", format, " with ", w.shape(0), " rows");
            FM_ARG(K % 32 == 0 && w.shape(1) == format_row_bytes(f, K), "repack_x8: rows must be ",
                   format_row_bytes(f, K), " bytes for K = ", K);
            auto out = numpy_owned<uint8_t>({w.shape(0), w.shape(1)});
            std::memcpy(out.data(), w.data(), w.shape(0) * w.shape(1));
            quant::repack_x8(f, out.data(), int64_t(w.shape(0)), K);
            return out;
        },
        "w"_a, "format"_a, "K"_a, "W (N, row bytes) with each group of 8 rows interleaved (quant.h: repack_x8).");
    m.def(
        "row_from_x8",
        [](U8Matrix w, const std::string& format, int K, int64_t r) {
            const Format f = format_from_name(format);
            FM_ARG(quant::can_repack_x8(f, int64_t(w.shape(0))) && K % 32 == 0 && w.shape(1) == format_row_bytes(f, K),
                   "row_from_x8: an interleaved q4_0, q4_1 or q8_0 matrix (N a multiple of 8, rows of K = ", K, ")");
            FM_ARG(r >= 0 && r < int64_t(w.shape(0)), "row_from_x8: row ", r, " out of range [0, ", w.shape(0), ")");
            auto out = numpy_owned<uint8_t>({w.shape(1)});
            quant::row_from_x8(f, w.data(), r, K, out.data());
            return out;
        },
        "w"_a, "format"_a, "K"_a, "r"_a, "Row r of a repack_x8 matrix, as its blocks were before.");
    m.def("quant_isas", [] {
        std::vector<std::string> out;
        if (quant::quant_kernels_avx2()) out.push_back("avx2");
        if (quant::quant_kernels_avx512()) out.push_back("avx512");
        return out;
    }, "The block-format kernel tables this CPU runs.");
    m.def(
        "gated",
        [](CF32Array h, CF32Array u, const std::string& activation, bool reference, const std::string& isa) {
            FM_ARG(h.size() == u.size(), "gated: h and u must have the same length, got ", h.size(), " and ", u.size());
            Activation act;
            FM_ARG(activation_from_name(activation, act), "unknown activation '", activation, "'");
            auto out = numpy_owned<float>({h.size()});
            std::copy(h.data(), h.data() + h.size(), out.data());
            if (reference) gated(act, out.data(), u.data(), int(h.size()));
            else pick_isa(isa)->gated(out.data(), u.data(), int(h.size()), act);
            return out;
        },
        "h"_a, "u"_a, "activation"_a = "silu", "reference"_a = false, "isa"_a = "best",
        "act(h) * u: the FFN's gating, from the kernel table or the scalar reference.");
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
           const std::string& isa, const std::string& activation) {
            fm::DType dt = weight_dtype(b, dtype);
            fm::Activation act;
            FM_ARG(fm::activation_from_name(activation, act), "activation must be 'silu' or 'gelu_tanh', got '",
                   activation, "'");
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
            if (reference) fm::ffn_decode_ref(y.data(), x.data(), ptrs.data(), dt, D, int(ptrs.size()), act);
            else pick_isa(isa)->ffn_decode[int(dt)](y.data(), x.data(), ptrs.data(), D, int(ptrs.size()), act);
            return y;
        },
        "y"_a, "x"_a, "bundles"_a, "dtype"_a, "rows"_a = nb::none(), "reference"_a = false, "isa"_a = "best",
        "activation"_a = "silu",
        "y + gated FFN (activation silu or gelu_tanh) of x over neuron bundles [gate | up | down | pad] (all, or the "
        "gathered `rows`)");
    m.def(
        "direct_read",
        [](const std::string& path, std::vector<uint64_t> offsets, size_t request_bytes, int queue_depth,
           bool submit, int misuse) {
            // reads requests of request_bytes at offsets with read(), or with submit() then wait();
            // misuse 1: submit twice, 2: wait with nothing submitted (each must raise)
            fm::DirectReader r(path, queue_depth);
            fm::Buffer buf(request_bytes * std::max<size_t>(1, offsets.size()), fm::kIoAlign);
            std::vector<fm::ReadRequest> reqs;
            for (size_t i = 0; i < offsets.size(); ++i)
                reqs.push_back({offsets[i], request_bytes, buf.data<char>() + i * request_bytes});
            nb::gil_scoped_release nogil;
            if (misuse == 2) r.wait();
            if (submit) {
                r.submit(reqs);
                if (misuse == 1) {
                    try {
                        r.submit(reqs);
                    } catch (...) {
                        r.wait();
                        throw;
                    }
                }
                r.wait();
            } else {
                r.read(reqs);
            }
            nb::gil_scoped_acquire gil;
            return nb::bytes(buf.data<char>(), request_bytes * offsets.size());
        },
        "path"_a, "offsets"_a, "request_bytes"_a, "queue_depth"_a = 8, "submit"_a = false, "misuse"_a = 0,
        "The bytes of requests at offsets, read with read() or with submit() and wait().");
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
        "bit_sum_i8",
        [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> bits,
           nb::ndarray<const int8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> z, bool reference,
           const std::string& isa) {
            const int n = int(z.size());
            FM_ARG(bits.shape(0) >= size_t((n + 7) / 8), "bits must hold at least ceil(len(z)/8) bytes");
            return reference ? fm::bit_sum_i8_ref(bits.data(), z.data(), n)
                             : pick_isa(isa)->bit_sum_i8(bits.data(), z.data(), n);
        },
        "bits"_a, "z"_a, "reference"_a = false, "isa"_a = "best", "bit_sum with int8 z (the predictor's kernel)");
    m.def(
        "attend",
        [](CF32Array q, nb::ndarray<nb::c_contig, nb::device::cpu> k, nb::ndarray<nb::c_contig, nb::device::cpu> v,
           const std::string& dtype, int r0, int n, float scale, const std::string& isa) {
            const fm::DType dt = weight_dtype(k, dtype);
            FM_ARG(weight_dtype(v, dtype) == dt, "k and v must have the same dtype");
            FM_ARG(q.ndim() == 2 && k.ndim() == 2 && v.ndim() == 2, "q, k and v must be 2-D");
            const int G = int(q.shape(0)), hd = int(q.shape(1)), rows = int(k.shape(0));
            const size_t ld = k.shape(1);
            FM_ARG(v.shape(0) == k.shape(0) && v.shape(1) == ld && ld >= size_t(hd), "k and v must be (rows, >= hd)");
            FM_ARG(r0 >= 0 && r0 < rows && n >= 1 && n <= rows, "need 0 <= r0 < rows and 1 <= n <= rows");
            const int len[2] = {std::min(n, rows - r0), n - std::min(n, rows - r0)};
            const size_t esz = fm::dtype_size(dt);
            const void* K[2] = {static_cast<const char*>(k.data()) + size_t(r0) * ld * esz, k.data()};
            const void* V[2] = {static_cast<const char*>(v.data()) + size_t(r0) * ld * esz, v.data()};
            auto out = numpy_owned<float>({size_t(G), size_t(hd)});
            std::vector<float> scores(size_t(G) * (n + 3));  // lds = n + 3: rows of scores apart
            pick_isa(isa)->attend[int(dt)](out.data(), q.data(), G, hd, K, V, len, ld, scale, scores.data(),
                                           size_t(n + 3));
            return out;
        },
        "q"_a, "k"_a, "v"_a, "dtype"_a, "r0"_a, "n"_a, "scale"_a, "isa"_a = "best",
        "Decode attention of q's G heads over n rows of k and v from row r0, wrapping to row 0 (a ring).");
    m.def(
        "argmax",
        [](CF32Array x, bool reference, const std::string& isa) {
            const int n = int(x.size());
            return reference ? fm::argmax_ref(x.data(), n) : pick_isa(isa)->argmax(x.data(), n);
        },
        "x"_a, "reference"_a = false, "isa"_a = "best", "the index of the first largest value, NaNs skipped");
    m.def(
        "predictor_scores_ref",
        [](nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> gs,
           nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> us, CF32Array gr, CF32Array ur,
           CF32Array gc, CF32Array uc, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> od,
           nb::ndarray<const int8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> ow, CF32Array os, CF32Array x,
           const std::string& activation) {
            const int D = int(x.size()), n = int(gs.shape(0)), M = int(od.shape(0));
            fm::Activation act;
            FM_ARG(fm::activation_from_name(activation, act), "activation must be 'silu' or 'gelu_tanh', got '",
                   activation, "'");
            FM_ARG(gs.shape(1) == size_t((D + 7) / 8) && us.shape(0) == gs.shape(0) && us.shape(1) == gs.shape(1) &&
                       gr.size() == size_t(n) && ur.size() == size_t(n) && gc.size() == size_t(D) && uc.size() == size_t(D) &&
                       ow.shape(0) == size_t(n) && ow.shape(1) == size_t(2 * M) && os.size() == size_t(2 * M),
                   "predictor tensors do not match");
            for (int j = 0; j < M; ++j) FM_ARG(od.data()[j] >= 0 && od.data()[j] < D, "outlier dim out of range");
            auto out = numpy_owned<float>({size_t(n)});
            fm::predictor_scores_ref({gs.data(), us.data(), gr.data(), ur.data(), gc.data(), uc.data(), od.data(), ow.data(),
                                      os.data(), M, act},
                                     x.data(), D, n, out.data());
            return out;
        },
        "gate_sign"_a, "up_sign"_a, "gate_row"_a, "up_row"_a, "gate_col"_a, "up_col"_a, "outlier_dims"_a,
        "outlier_weight"_a, "outlier_scale"_a, "x"_a, "activation"_a = "silu",
        "Scalar reference of the sparsity predictor's scores for one token.");
}

}  // namespace fm::bindings
