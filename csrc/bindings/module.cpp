// The nanobind module flashmem._core: each area binds itself (bindings/common.h lists them).
#include "bindings/common.h"

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <vector>

#include "core/buffer.h"
#include "model/weight_stream.h"
#include "core/format.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/quant/quantize.h"

namespace {

namespace nb = nanobind;

// "float64", "int32", "bfloat16", ...: an array's dtype as numpy names it.
std::string dtype_str(nb::dlpack::dtype dt) {
    static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    const char* code = dt.code < 7 ? codes[dt.code] : "?";
    return dt.code == uint8_t(nb::dlpack::dtype_code::Bool) ? code : code + std::to_string(dt.bits);
}

// x (rows, cols) float32, C-contiguous, in the block format: (rows, row bytes) uint8, as a GGUF
// tensor's bytes; bit-exact with ggml's reference quantizers. Blocks are split over `threads`.
nb::ndarray<nb::numpy, uint8_t> py_quantize(const std::string& format, nb::ndarray<nb::ro, nb::device::cpu> x,
                                            int threads) {
    const fm::Format f = fm::format_from_name(format);
    const fm::FormatTraits& t = fm::format_traits(f);
    FM_ARG(fm::is_block_format(f), "quantize: ", t.name,
           " is not a block format (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)");
    FM_ARG(x.ndim() == 2, "quantize: x must be 2-D (rows, cols), got ", x.ndim(), " dimensions");
    FM_ARG(x.dtype() == nb::dtype<float>(), "quantize: x must be float32, got ", dtype_str(x.dtype()));
    const size_t rows = x.shape(0), cols = x.shape(1);
    FM_ARG(rows * cols == 0 || ((rows == 1 || x.stride(0) == int64_t(cols)) && (cols == 1 || x.stride(1) == 1)),
           "quantize: x must be C-contiguous (np.ascontiguousarray(x))");
    FM_ARG(cols % size_t(t.block) == 0, "quantize: a row of ", cols, " weights is not a whole number of ", t.name,
           " blocks (", t.block, " weights each)");
    FM_ARG(threads >= 1, "quantize: threads must be >= 1, got ", threads);
    const size_t row_bytes = fm::format_row_bytes(f, int64_t(cols));
    auto out = fm::bindings::numpy_owned<uint8_t>({rows, row_bytes});
    const auto* src = static_cast<const float*>(x.data());
    uint8_t* dst = out.data();
    const size_t n_blocks = rows * cols / size_t(t.block);
    const int nt = int(std::min<size_t>(size_t(threads), std::max<size_t>(n_blocks / 64, 1)));
    {
        nb::gil_scoped_release nogil;
        fm::ThreadPool pool(nt);  // raises if a thread cannot start
        pool.parallel_for(n_blocks, 1, [&](size_t b, size_t e, int) {  // rows are whole blocks: a chunk may span rows
            fm::quant::quantize(f, src + b * t.block, dst + b * t.block_bytes, int64_t(e - b) * t.block);
        });
    }
    return out;
}

}  // namespace

NB_MODULE(_core, m) {
    namespace nb = nanobind;
    m.doc() = "flashmem native core";
    m.def("isa", [] { return std::string(fm::kernels().isa); }, "SIMD instruction set the kernels use");
    m.def("tensor_footprint", &fm::Tensor::footprint, nb::arg("nbytes"),
          "bytes a weight matrix of nbytes takes once loaded (large ones in whole 2 MiB huge pages)");
    m.def("owned_bytes", [] { return size_t(fm::owned_bytes()); }, "bytes held by all native buffers");
    m.def("cuda_available", &fm::cuda::available, "True when built with CUDA and a GPU is visible");
    m.def(
        "format_block",
        [](const std::string& name) {
            const fm::FormatTraits& t = fm::format_traits(fm::format_from_name(name));
            return std::make_pair(t.block, t.block_bytes);
        },
        "(weights, bytes) per block of a weight format (f32: (1, 4), q4_k: (256, 144), ...)");
    m.def("quantize", &py_quantize, nb::arg("format"), nb::arg("x"), nb::arg("threads") = 1,
          "x (rows, cols) float32 in a block format (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; cols a "
          "multiple of its block) as uint8 (rows, row bytes), the bytes of a GGUF tensor; bit-exact with ggml's "
          "reference quantizers (llama.cpp's without an importance matrix, gguf-py's).");
    m.def("stream_staging_for", &fm::WeightStream::staging_for, nb::arg("sizes"),
          "Staging bytes the weight stream needs to read byte ranges of these sizes in one batch.");
    fm::bindings::bind_memory(m);
    fm::bindings::bind_model(m);
    fm::bindings::bind_testing(m);
    fm::bindings::bind_cuda(m);
}
