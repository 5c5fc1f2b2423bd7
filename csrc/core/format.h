// Weight formats: the float types (f32, f16, bf16) and ggml's block formats, whose bytes are
// those of a GGUF file (csrc/kernels/quant/blocks.h has the layouts). A row of `cols` weights in
// a block format is cols / block blocks of block_bytes each; cols must be a multiple of block.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace fm {

enum class Format : int { F32 = 0, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K };
constexpr int kFormats = 11;

struct FormatTraits {
    const char* name;
    int block;        // weights per block (1 for the float formats)
    int block_bytes;  // bytes per block
};

inline const FormatTraits& format_traits(Format f) {
    static const FormatTraits traits[kFormats] = {
        {"f32", 1, 4},     {"f16", 1, 2},     {"bf16", 1, 2},    {"q8_0", 32, 34},  {"q4_0", 32, 18}, {"q4_1", 32, 20},
        {"q5_0", 32, 22},  {"q5_1", 32, 24},  {"q4_k", 256, 144}, {"q5_k", 256, 176}, {"q6_k", 256, 210},
    };
    return traits[int(f)];
}

inline const char* format_name(Format f) { return format_traits(f).name; }
inline bool is_block_format(Format f) { return format_traits(f).block > 1; }

// Case-insensitive ("Q4_K" or "q4_k"); unknown names raise, naming the ones known.
inline Format format_from_name(const std::string& s) {
    std::string lower;
    for (char c : s) lower += char(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    for (int i = 0; i < kFormats; ++i)
        if (lower == format_traits(Format(i)).name) return Format(i);
    FM_ARG(false, "unknown weight format '", s,
           "' (known: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)");
}

// Bytes of a row of `cols` weights; a row that is not a whole number of blocks raises.
inline size_t format_row_bytes(Format f, int64_t cols) {
    const FormatTraits& t = format_traits(f);
    FM_ARG(cols >= 0 && cols % t.block == 0, "a row of ", cols, " weights is not a whole number of ", t.name,
           " blocks (", t.block, " weights each)");
    return size_t(cols / t.block) * t.block_bytes;
}

inline Format format_of(DType dt) { return Format(int(dt)); }

}  // namespace fm
