// The build's and the machine's CUDA facts, shared by the kernel files.
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::cuda {

bool built() { return true; }

bool available() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) cudaGetLastError();  // not left as the last error of a later launch
    return e == cudaSuccess && n > 0;
}

void detail::require_device(const char* what) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) cudaGetLastError();
    FM_IO(e == cudaSuccess && n > 0, what, ": no CUDA device is available (",
          e == cudaSuccess ? "the driver sees none" : cudaGetErrorString(e), ")");
}

}  // namespace fm::cuda
