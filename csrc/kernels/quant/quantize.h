// Quantization of float weights to ggml's block formats (blocks.h), bit-exact with ggml's
// reference quantizers (ggml-quants.c, quantize_row_*_ref: what llama.cpp's quantizer and
// gguf-py write when there is no importance matrix). Scalar: it converts models, it is not on
// the inference path.
#pragma once
#include <cstdint>

#include "core/format.h"

namespace fm::quant {

// out (n / block blocks of the format's bytes) = x (n floats) in the block format f; n a
// multiple of f's block (32, or 256 for the K formats). Blocks are independent: a row can be
// quantized in pieces of whole blocks, by several threads.
void quantize(Format f, const float* x, void* out, int64_t n);

}  // namespace fm::quant
