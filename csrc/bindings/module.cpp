// The nanobind module flashmem._core: each area binds itself (bindings/common.h lists them).
#include "bindings/common.h"

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include "core/buffer.h"
#include "core/format.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda_kernels.h"

NB_MODULE(_core, m) {
    namespace nb = nanobind;
    m.doc() = "flashmem native core";
    m.def("isa", [] { return std::string(fm::kernels().isa); }, "SIMD instruction set the kernels use");
    m.def("owned_bytes", [] { return size_t(fm::owned_bytes()); }, "bytes held by all native buffers");
    m.def("cuda_available", &fm::cuda::available, "True when built with CUDA and a GPU is visible");
    m.def(
        "format_block",
        [](const std::string& name) {
            const fm::FormatTraits& t = fm::format_traits(fm::format_from_name(name));
            return std::make_pair(t.block, t.block_bytes);
        },
        "(weights, bytes) per block of a weight format (f32: (1, 4), q4_k: (256, 144), ...)");
    fm::bindings::bind_memory(m);
    fm::bindings::bind_model(m);
    fm::bindings::bind_testing(m);
}
