// The block-format kernels (quant_simd.inl) for CPUs with AVX-512 VNNI: the same code on 256-bit
// vectors, with the integer dot products fused (vpdpbusd, vpdpwssd) and 32 vector registers.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c
// -ffp-contract=off.
#define FM_QUANT_VNNI 1
#define FM_QUANT_TABLE avx512_vnni_table
#define FM_QUANT_ISA_NAME "avx512_vnni"
#include "kernels/quant/quant_simd.inl"
