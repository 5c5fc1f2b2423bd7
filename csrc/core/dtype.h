// Storage dtypes of weights. Computation is always f32.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"

namespace fm {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline size_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

inline const char* dtype_name(DType dt) {
    switch (dt) {
        case DType::F32: return "f32";
        case DType::F16: return "f16";
        case DType::BF16: return "bf16";
    }
    return "?";
}

inline DType dtype_from_name(const std::string& s) {
    if (s == "f32" || s == "F32") return DType::F32;
    if (s == "f16" || s == "F16") return DType::F16;
    if (s == "bf16" || s == "BF16") return DType::BF16;
    FM_ARG(false, "unknown dtype '", s, "' (expected f32, f16 or bf16)");
}

// Scalar conversions: the reference for the SIMD ones.
inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// f32 -> f16 bits, rounding to nearest even (as F16C and numpy do); overflow gives inf.
inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    const uint32_t abs = u & 0x7fffffff;
    if (abs >= 0x7f800000) return uint16_t(sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0));  // inf, nan
    if (abs >= 0x477ff000) return uint16_t(sign | 0x7c00);  // rounds past the largest f16
    if (abs < 0x38800000) {  // an f16 subnormal (or zero): round the value scaled by 2^24
        const uint32_t shift = 126 - (abs >> 23);
        if (shift > 24) return uint16_t(sign);
        const uint32_t man = (abs & 0x7fffff) | 0x800000;
        uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) ++q;
        return uint16_t(sign | q);
    }
    uint32_t h = ((abs >> 13) - (112u << 10));  // rebias the exponent 127 -> 15
    const uint32_t rem = abs & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return uint16_t(sign | h);
}

inline float load_as_f32(const void* p, DType dt, size_t i) {
    switch (dt) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
    return 0.f;
}

}  // namespace fm
