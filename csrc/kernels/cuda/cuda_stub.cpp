// Stands in for the CUDA kernels when the build has no nvcc.
#include "core/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::cuda {

bool available() { return false; }

void gemv_f16(float*, const float*, const uint16_t*, int, int) {
    FM_ARG(false, "flashmem was built without CUDA (nvcc was not found at build time)");
}

}  // namespace fm::cuda
