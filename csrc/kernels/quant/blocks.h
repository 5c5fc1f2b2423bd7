// The block formats' bytes, as ggml lays them out (so a GGUF tensor is used as it is), and the
// 8-bit activation blocks the integer dot products take.
//
//   q8_0  x = d * q                       q: int8
//   q4_0  x = d * (q - 8)                 q: 4 bits; byte j holds weight j (low nibble), j+16 (high)
//   q4_1  x = d * q + m                   as q4_0
//   q5_0  x = d * (q - 16)                low 4 bits as q4_0; bit i of qh is weight i's fifth bit
//   q5_1  x = d * q + m                   as q5_0
//   q4_k  256 weights in 8 sub-blocks of 32: x = d * sc[s] * q - dmin * mn[s], sc and mn 6-bit,
//         packed in scales[12] (unpack_scale_min); qs: 32 bytes per 64 weights, sub-block 2j in
//         the low nibbles and 2j+1 in the high ones
//   q5_k  as q4_k, plus bit s of qh[l] as the fifth bit of weight l of sub-block s
//   q6_k  256 weights in 16 sub-blocks of 16: x = d * sc[s] * (q - 32), sc int8; per 128
//         weights, ql holds the low 4 bits (64 bytes), qh the high 2 bits (32 bytes): weight
//         32k + l (k = 0..3) is ql[l + 32 (k & 1)] (low nibble for k < 2, else high) and bits
//         2k, 2k+1 of qh[l]
// d, m, dmin: f16.
#pragma once
#include <cstdint>

namespace fm::quant {

// Blocks are read where they lie: a bundle's pieces and a GGUF's tensors start at any byte, so
// the structs ask for no alignment (their 16-bit fields are read with unaligned loads, which x86
// does at full speed; a misaligned access through an aligned type would be undefined behaviour).
#define FM_BLOCK __attribute__((packed))

struct FM_BLOCK BlockQ8_0 { uint16_t d; int8_t qs[32]; };
struct FM_BLOCK BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct FM_BLOCK BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct FM_BLOCK BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct FM_BLOCK BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct FM_BLOCK BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct FM_BLOCK BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct FM_BLOCK BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };

// Block b of 8 rows of a q4_0 (Min false) or q4_1 matrix, interleaved (quant.h: repack_x8): the 8
// rows' scales d, their mins m (q4_1), then 4 vectors of 32 bytes: byte 4r + i of vector v holds
// weight 8v + i of row r in its low nibble and weight 8v + 4 + i in its high nibble. The same
// bytes as the 8 rows' blocks (144 = 8 x 18, 160 = 8 x 20).
template <bool Min>
struct BlockQ4x8;
template <>
struct FM_BLOCK BlockQ4x8<false> { uint16_t d[8]; uint8_t qs[128]; };
template <>
struct FM_BLOCK BlockQ4x8<true> { uint16_t d[8], m[8]; uint8_t qs[128]; };
// Block b of 8 rows of a q8_0 matrix, interleaved for 16-bit activations (quant.h: repack_x8;
// the LM head): the 8 rows' scales d, then 16 pieces of 16 bytes: byte 2r + i of piece j holds
// weight 2j + i of row r, so that a piece widened to int16 pairs with the token's activations
// 2j, 2j + 1 in each row's lane. The same bytes as the 8 rows' blocks (272 = 8 x 34).
struct FM_BLOCK BlockQ8x8 { uint16_t d[8]; int8_t qs[256]; };
static_assert(sizeof(BlockQ8x8) == 272, "block size");
static_assert(sizeof(BlockQ4x8<false>) == 144 && sizeof(BlockQ4x8<true>) == 160, "block size");
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20, "block size");
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24, "block size");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210, "block size");

// Scale and min of sub-block s (0..7) of a q4_k or q5_k block, 6 bits each: s < 4 in the low 6
// bits of scales[s] and scales[s + 4]; s >= 4 in the nibbles of scales[s + 4] and the top 2
// bits of scales[s - 4] and scales[s].
inline void unpack_scale_min(const uint8_t* scales, int s, uint8_t* sc, uint8_t* mn) {
    if (s < 4) {
        *sc = scales[s] & 63;
        *mn = scales[s + 4] & 63;
    } else {
        *sc = (scales[s + 4] & 0xF) | ((scales[s - 4] >> 6) << 4);
        *mn = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
    }
}

// 32 activations quantized to integers: x ~ d * qs, s = d * sum(qs) (for the formats with an
// offset or a min). Every block format's dot product runs over these, 32 weights at a time:
// int8 (ActBlock, as ggml does) for the matrices, int16 (ActBlock16) where a layer's outputs are
// compared closely, as the logits are (LM head).
template <typename Q>
struct ActBlockOf {
    float d, s;
    Q qs[32];
};
using ActBlock = ActBlockOf<int8_t>;
using ActBlock16 = ActBlockOf<int16_t>;
constexpr int kActBlock = 32;

}  // namespace fm::quant
