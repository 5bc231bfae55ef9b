/* Shared pieces of the inline-assembly 4-token x 3-row tiles (int8_gemm.c, kquant.c): the twelve
 * int32 accumulators live in ymm0..ymm11 (token t, row r in ymm(3t + r)); they are zeroed before
 * the tile and stored to 12 x 32 bytes at %[out] after it. */
#ifndef OMNISTREAM_TILE_ASM_H
#define OMNISTREAM_TILE_ASM_H

#define TILE12_ZERO \
    "vpxor %%ymm0, %%ymm0, %%ymm0\n\t" \
    "vpxor %%ymm1, %%ymm1, %%ymm1\n\t" \
    "vpxor %%ymm2, %%ymm2, %%ymm2\n\t" \
    "vpxor %%ymm3, %%ymm3, %%ymm3\n\t" \
    "vpxor %%ymm4, %%ymm4, %%ymm4\n\t" \
    "vpxor %%ymm5, %%ymm5, %%ymm5\n\t" \
    "vpxor %%ymm6, %%ymm6, %%ymm6\n\t" \
    "vpxor %%ymm7, %%ymm7, %%ymm7\n\t" \
    "vpxor %%ymm8, %%ymm8, %%ymm8\n\t" \
    "vpxor %%ymm9, %%ymm9, %%ymm9\n\t" \
    "vpxor %%ymm10, %%ymm10, %%ymm10\n\t" \
    "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"

#define TILE12_STORE \
    "vmovdqa %%ymm0, 0(%[out])\n\t" \
    "vmovdqa %%ymm1, 32(%[out])\n\t" \
    "vmovdqa %%ymm2, 64(%[out])\n\t" \
    "vmovdqa %%ymm3, 96(%[out])\n\t" \
    "vmovdqa %%ymm4, 128(%[out])\n\t" \
    "vmovdqa %%ymm5, 160(%[out])\n\t" \
    "vmovdqa %%ymm6, 192(%[out])\n\t" \
    "vmovdqa %%ymm7, 224(%[out])\n\t" \
    "vmovdqa %%ymm8, 256(%[out])\n\t" \
    "vmovdqa %%ymm9, 288(%[out])\n\t" \
    "vmovdqa %%ymm10, 320(%[out])\n\t" \
    "vmovdqa %%ymm11, 352(%[out])\n\t"

#endif
