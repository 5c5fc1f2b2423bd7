// What the binding files share: nanobind (only csrc/bindings/ includes it), array types, and
// numpy arrays that own native memory. Each area binds itself in its own file:
//   module.cpp   the module flashmem._core, its build facts (isa, owned_bytes, cuda_available) and
//                the weight formats (format_block, quantize)
//   model.cpp    Config and Model (loading, forward, sparse/flash FFN)
//   memory.cpp   MemoryBank
//   testing.cpp  kernel entry points with their scalar references, the disk benchmark
//   cuda.cpp     the CUDA kernels through host arrays, and their CPU references
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <vector>

namespace fm::bindings {

namespace nb = nanobind;

using F32Array = nb::ndarray<float, nb::numpy, nb::c_contig>;
using CF32Array = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32Vector = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A zero-filled numpy array of `shape` that owns its memory.
template <typename T>
nb::ndarray<nb::numpy, T> numpy_owned(std::vector<size_t> shape) {
    size_t n = 1;
    for (auto s : shape) n *= s;
    T* data = new T[n]();
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

void bind_model(nb::module_& m);
void bind_memory(nb::module_& m);
void bind_testing(nb::module_& m);
void bind_cuda(nb::module_& m);

}  // namespace fm::bindings
