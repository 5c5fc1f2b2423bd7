// Dequantization, bit-exact with ggml: compiled with -ffp-contract=off, so each multiply and
// add rounds as ggml's reference code does. And the run-time choice of the kernel table.
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/quant/quant.h"

namespace fm::quant {

extern const QuantKernels avx2_table;
extern const QuantKernels avx512_vnni_table;

namespace {
template <typename Block>
const Block* blocks(const void* p) { return static_cast<const Block*>(p); }

void dequant_block(Format f, const void* blk, float* y) {
    switch (f) {
        case Format::Q8_0: {
            const auto* b = blocks<BlockQ8_0>(blk);
            const float d = f16_to_f32(b->d);
            for (int i = 0; i < 32; ++i) y[i] = float(b->qs[i]) * d;
            return;
        }
        case Format::Q4_0: {
            const auto* b = blocks<BlockQ4_0>(blk);
            const float d = f16_to_f32(b->d);
            for (int j = 0; j < 16; ++j) {
                y[j] = d * float((b->qs[j] & 0xF) - 8);
                y[j + 16] = d * float((b->qs[j] >> 4) - 8);
            }
            return;
        }
        case Format::Q4_1: {
            const auto* b = blocks<BlockQ4_1>(blk);
            const float d = f16_to_f32(b->d), m = f16_to_f32(b->m);
            for (int j = 0; j < 16; ++j) {
                y[j] = d * float(b->qs[j] & 0xF) + m;
                y[j + 16] = d * float(b->qs[j] >> 4) + m;
            }
            return;
        }
        case Format::Q5_0:
        case Format::Q5_1: {
            const bool q50 = f == Format::Q5_0;
            const auto* b0 = blocks<BlockQ5_0>(blk);
            const auto* b1 = blocks<BlockQ5_1>(blk);
            const uint8_t* qs = q50 ? b0->qs : b1->qs;
            uint32_t qh;
            std::memcpy(&qh, q50 ? b0->qh : b1->qh, 4);
            const float d = f16_to_f32(q50 ? b0->d : b1->d), m = q50 ? 0.f : f16_to_f32(b1->m);
            for (int i = 0; i < 32; ++i) {
                const int q = ((i < 16 ? qs[i] : qs[i - 16] >> 4) & 0xF) | (((qh >> i) & 1) << 4);
                y[i] = q50 ? d * float(q - 16) : d * float(q) + m;
            }
            return;
        }
        case Format::Q4_K:
        case Format::Q5_K: {
            const bool q5 = f == Format::Q5_K;
            const auto* b4 = blocks<BlockQ4_K>(blk);
            const auto* b5 = blocks<BlockQ5_K>(blk);
            const uint8_t* scales = q5 ? b5->scales : b4->scales;
            const uint8_t* qs = q5 ? b5->qs : b4->qs;
            const float d = f16_to_f32(q5 ? b5->d : b4->d), dmin = f16_to_f32(q5 ? b5->dmin : b4->dmin);
            for (int s = 0; s < 8; ++s) {
                uint8_t sc, mn;
                unpack_scale_min(scales, s, &sc, &mn);
                const float ds = d * float(sc), dm = dmin * float(mn);
                for (int l = 0; l < 32; ++l) {
                    int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0xF;
                    if (q5) q |= ((b5->qh[l] >> s) & 1) << 4;
                    y[32 * s + l] = ds * float(q) - dm;
                }
            }
            return;
        }
        case Format::Q6_K: {
            const auto* b = blocks<BlockQ6_K>(blk);
            const float d = f16_to_f32(b->d);
            for (int half = 0; half < 2; ++half) {
                const uint8_t* ql = b->ql + 64 * half;
                const uint8_t* qh = b->qh + 32 * half;
                for (int k = 0; k < 4; ++k)
                    for (int l = 0; l < 32; ++l) {
                        const int lo = (ql[l + 32 * (k & 1)] >> (4 * (k >> 1))) & 0xF;
                        const int q = (lo | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                        const int i = 128 * half + 32 * k + l;
                        y[i] = (d * float(b->scales[i / 16])) * float(q);
                    }
            }
            return;
        }
        default:
            FM_ARG(false, "dequantize: ", format_name(f), " is not a block format");
    }
}
}  // namespace

void dequantize(Format f, const void* src, float* y, int64_t n) {
    const FormatTraits& t = format_traits(f);
    FM_ARG(t.block > 1 && n % t.block == 0, "dequantize: ", n, " weights are not whole ", t.name, " blocks");
    for (int64_t b = 0; b < n / t.block; ++b)
        dequant_block(f, static_cast<const uint8_t*>(src) + b * t.block_bytes, y + b * t.block);
}

const QuantKernels* quant_kernels_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
               ? &avx2_table
               : nullptr;
}

const QuantKernels* quant_kernels_avx512() {
    return quant_kernels_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
               ? &avx512_vnni_table
               : nullptr;
}

const QuantKernels& quant_kernels() {
    static const QuantKernels* best = [] {
        const char* force = std::getenv("FLASHMEM_ISA");  // "avx2" runs the fallback on an AVX-512 CPU
        if (force && std::string(force) == "avx2") return quant_kernels_avx2();
        const QuantKernels* k = quant_kernels_avx512();
        return k ? k : quant_kernels_avx2();
    }();
    FM_ARG(best != nullptr, "this CPU lacks AVX2/FMA/F16C, which flashmem requires");
    return *best;
}

const QuantKernels* quant_kernels_for(const std::string& isa) {
    if (isa == "best") return &quant_kernels();
    if (isa == "avx2") return quant_kernels_avx2();
    if (isa == "avx512" || isa == "avx512_vnni") return quant_kernels_avx512();
    FM_ARG(false, "unknown ISA '", isa, "' (best, avx2, avx512)");
    return nullptr;
}

bool can_repack_x8(Format f, int64_t rows) {
    return (f == Format::Q4_0 || f == Format::Q4_1 || f == Format::Q8_0) && rows % 8 == 0;
}

namespace {
template <bool Min>
void repack_group(const uint8_t* rows, size_t row_bytes, int nb, BlockQ4x8<Min>* out) {
    using Src = std::conditional_t<Min, BlockQ4_1, BlockQ4_0>;
    for (int b = 0; b < nb; ++b) {
        BlockQ4x8<Min>& o = out[b];
        uint8_t w[8][32];  // the 8 rows' weights (0..15) of block b
        for (int r = 0; r < 8; ++r) {
            const Src& src = reinterpret_cast<const Src*>(rows + r * row_bytes)[b];
            o.d[r] = src.d;
            if constexpr (Min) o.m[r] = src.m;
            for (int i = 0; i < 16; ++i) w[r][i] = src.qs[i] & 0x0F, w[r][i + 16] = src.qs[i] >> 4;
        }
        for (int v = 0; v < 4; ++v)
            for (int r = 0; r < 8; ++r)
                for (int i = 0; i < 4; ++i)
                    o.qs[32 * v + 4 * r + i] = uint8_t(w[r][8 * v + i] | (w[r][8 * v + 4 + i] << 4));
    }
}
// Undoes repack_group for row r of the group: its blocks as the file had them.
template <bool Min>
void unpack_group_row(const BlockQ4x8<Min>* g, int nb, int r, uint8_t* row) {
    using Src = std::conditional_t<Min, BlockQ4_1, BlockQ4_0>;
    for (int b = 0; b < nb; ++b) {
        Src& dst = reinterpret_cast<Src*>(row)[b];
        dst.d = g[b].d[r];
        if constexpr (Min) dst.m = g[b].m[r];
        uint8_t w[32];
        for (int v = 0; v < 4; ++v)
            for (int i = 0; i < 4; ++i) {
                const uint8_t q = g[b].qs[32 * v + 4 * r + i];
                w[8 * v + i] = q & 0x0F, w[8 * v + 4 + i] = q >> 4;
            }
        for (int i = 0; i < 16; ++i) dst.qs[i] = uint8_t(w[i] | (w[i + 16] << 4));
    }
}

void repack_group_q8(const uint8_t* rows, size_t row_bytes, int nb, BlockQ8x8* out) {
    for (int b = 0; b < nb; ++b)
        for (int r = 0; r < 8; ++r) {
            const BlockQ8_0& src = reinterpret_cast<const BlockQ8_0*>(rows + r * row_bytes)[b];
            out[b].d[r] = src.d;
            for (int j = 0; j < 16; ++j)
                for (int i = 0; i < 2; ++i) out[b].qs[16 * j + 2 * r + i] = src.qs[2 * j + i];
        }
}

void unpack_group_row_q8(const BlockQ8x8* g, int nb, int r, uint8_t* row) {
    for (int b = 0; b < nb; ++b) {
        BlockQ8_0& dst = reinterpret_cast<BlockQ8_0*>(row)[b];
        dst.d = g[b].d[r];
        for (int j = 0; j < 16; ++j)
            for (int i = 0; i < 2; ++i) dst.qs[2 * j + i] = g[b].qs[16 * j + 2 * r + i];
    }
}
}  // namespace

void row_from_x8(Format f, const void* data, int64_t r, int K, void* row) {
    FM_ARG(can_repack_x8(f, 8) && K > 0 && K % 32 == 0 && r >= 0, "row_from_x8: a q4_0, q4_1 or q8_0 row of K = ", K);
    const size_t row_bytes = format_row_bytes(f, K);
    const auto* group = static_cast<const uint8_t*>(data) + size_t(r / 8) * 8 * row_bytes;
    const int nb = K / 32, i = int(r % 8);
    auto* out = static_cast<uint8_t*>(row);
    if (f == Format::Q8_0) unpack_group_row_q8(reinterpret_cast<const BlockQ8x8*>(group), nb, i, out);
    else if (f == Format::Q4_1) unpack_group_row(reinterpret_cast<const BlockQ4x8<true>*>(group), nb, i, out);
    else unpack_group_row(reinterpret_cast<const BlockQ4x8<false>*>(group), nb, i, out);
}

void repack_x8(Format f, void* data, int64_t rows, int K) {
    FM_ARG(can_repack_x8(f, rows), "repack_x8: needs a q4_0, q4_1 or q8_0 matrix of rows a multiple of 8");
    FM_ARG(K > 0 && K % 32 == 0, "repack_x8: K must be a positive multiple of 32, got ", K);
    const size_t row_bytes = format_row_bytes(f, K), group = 8 * row_bytes;
    const int nb = K / 32;
    std::vector<uint8_t> tmp(group);
    auto* bytes = static_cast<uint8_t*>(data);
    for (int64_t g = 0; g < rows / 8; ++g) {
        uint8_t* at = bytes + size_t(g) * group;
        std::memcpy(tmp.data(), at, group);
        if (f == Format::Q8_0) repack_group_q8(tmp.data(), row_bytes, nb, reinterpret_cast<BlockQ8x8*>(at));
        else if (f == Format::Q4_1) repack_group<true>(tmp.data(), row_bytes, nb, reinterpret_cast<BlockQ4x8<true>*>(at));
        else repack_group<false>(tmp.data(), row_bytes, nb, reinterpret_cast<BlockQ4x8<false>*>(at));
    }
}

}  // namespace fm::quant
