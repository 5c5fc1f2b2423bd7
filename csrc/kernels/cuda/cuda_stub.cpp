// Stands in for the CUDA kernels when the build has no nvcc: the same entry points, which check
// their arguments as the real ones do (checks.h) and then raise that CUDA is absent.
#include "core/error.h"
#include "kernels/cuda/checks.h"
#include "kernels/cuda/cuda_kernels.h"

namespace fm::cuda {

namespace {
[[noreturn]] void absent(const char* what) {
    raise<std::runtime_error>(__FILE__, __LINE__, what,
                              ": flashmem was built without CUDA (nvcc was not found at build time, or FLASHMEM_CUDA=OFF)");
}
}  // namespace

bool built() { return false; }
bool available() { return false; }

void gemv(Format f, float*, const float*, const void*, int T, int N, int K) {
    check_gemv(f, T, N, K);
    absent("cuda gemv");
}

void gemv_f16(float* y, const float* x, const uint16_t* W, int N, int K) { gemv(Format::F16, y, x, W, 1, N, K); }

void rmsnorm(float*, const float*, const float*, int rows, int d, float eps) {
    check_rmsnorm(rows, d, eps);
    absent("cuda rmsnorm");
}

void add(float*, const float*, size_t) { absent("cuda add"); }

void rope(float*, int T, size_t ld, int n_heads, int head_dim, const float*, const float*) {
    check_rope(T, ld, n_heads, head_dim);
    absent("cuda rope");
}

void gated(Activation act, float*, const float*, const float*, size_t) {
    FM_ARG(act == Activation::SiLU || act == Activation::GeluTanh, "cuda gated: unknown activation ", int(act));
    absent("cuda gated");
}

void attention_decode(float*, const float*, const void*, const void*, DType kv_dtype, const int32_t* lengths, int B,
                      int rows, int n_heads, int n_kv_heads, int head_dim, float scale, int chunk) {
    check_attention(kv_dtype, lengths, B, rows, n_heads, n_kv_heads, head_dim, scale, chunk);
    absent("cuda attention_decode");
}

void argmax(int32_t*, const float*, int T, int vocab) {
    check_argmax(T, vocab);
    absent("cuda argmax");
}

}  // namespace fm::cuda
