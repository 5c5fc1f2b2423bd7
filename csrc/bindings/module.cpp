// The nanobind module flashmem._core: each area binds itself (bindings/common.h lists them).
#include "bindings/common.h"
#include "core/buffer.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda_kernels.h"

NB_MODULE(_core, m) {
    namespace nb = nanobind;
    m.doc() = "flashmem native core";
    m.def("isa", [] { return std::string(fm::kernels().isa); }, "SIMD instruction set the kernels use");
    m.def("owned_bytes", [] { return size_t(fm::owned_bytes()); }, "bytes held by all native buffers");
    m.def("cuda_available", &fm::cuda::available, "True when built with CUDA and a GPU is visible");
    fm::bindings::bind_memory(m);
    fm::bindings::bind_model(m);
    fm::bindings::bind_testing(m);
}
