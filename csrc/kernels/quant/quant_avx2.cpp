// The block-format kernels (quant_simd.inl) for AVX2 CPUs. Compiled with -mavx2 -mfma -mf16c
// -ffp-contract=off.
#define FM_QUANT_VNNI 0
#define FM_QUANT_TABLE avx2_table
#define FM_QUANT_ISA_NAME "avx2"
#include "kernels/quant/quant_simd.inl"
