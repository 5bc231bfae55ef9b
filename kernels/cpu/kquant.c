/* Linear layers straight from GGUF quantized blocks, for AVX2 CPUs: y = x @ W.T (+ b).
 *
 * Weights stay in their GGUF blocks (exact to the file): Q4_K and Q6_K (256 per super-block),
 * Q8_0 and Q5_0 (32 per block). Q4_K is repacked at load with its 6-bit scales and mins spread to
 * bytes (148 bytes instead of 144); the others are used as stored. See kquant.py for the layouts.
 *
 * Activations are quantized per token to int8, symmetric, one float scale per QB values (256
 * for the K-quants, like llama.cpp's Q8_K; 32 for Q8_0/Q5_0) and the int16 sum of every 16
 * quantized values (the K-quants' mins and the -32 of Q6_K come off through these sums).
 *
 * Integer work inside a super-block, float work once per super-block:
 *   Q4_K: w = d*sc[j]*q - dmin*m[j], q in 0..15, j the 32-value sub-block:
 *         sum = d*da * sum_j sc[j] * (q . a)_j  -  dmin*da * sum_j m[j] * asum_j
 *   Q6_K: w = d*sc[i]*(q - 32), q in 0..63, i the 16-value sub-block:
 *         sum = d*da * (sum_i sc[i] * (q . a)_i - 32 * sum_i sc[i] * asum_i)
 * The u8 x s8 products go through _mm256_maddubs_epi16 (pairs at most 2*63*127 = 16002, no
 * saturation) and _mm256_madd_epi16 with the sub-block scales as its int16 operand (the scale
 * multiply is the widening add). Q8_0/Q5_0 blocks are signed (-127..127, -16..15): the sign of
 * the weight moves onto the activation (maddubs(|w|, sign(a, w))), and each 32-block is one
 * float multiply-add.
 *
 * Tiles: MT tokens x NR weight rows; the rows' blocks are unpacked once per tile and used for MT
 * tokens. Decoding (M = 1) runs 1 x 4 tiles with a software prefetch ahead of the weight sweep
 * (memory bound); prefills run 4 x 2 tiles over token blocks that stay in L2 (compute bound),
 * Q4_K and Q6_K 4 x 3 ones whose integer part is in assembly (q4k/q6k_sb4x3_asm: 12 accumulators).
 * Every tile shape gives the same integer sums (lane for lane) and float steps per output.
 * Output rows are handed out in chunks through parallel_chunks (pool.c).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "tile_asm.h"

#define INLINE static inline __attribute__((always_inline))

#ifndef KQ_PF_DIST
#define KQ_PF_DIST 4096 /* decoding: software prefetch distance (bytes) ahead of the tile sweep (1536 on an AVX2-only EPYC; Zen 4: 4096) */
#endif

/* GGML type ids. */
enum { KQ_Q5_0 = 6, KQ_Q8_0 = 8, KQ_Q4_K = 12, KQ_Q6_K = 14 };

typedef struct { uint16_t d, dmin; uint8_t sc[8], m[8]; uint8_t qs[128]; } blk_q4k; /* repacked */
typedef struct { uint8_t ql[128], qh[64]; int8_t sc[16]; uint16_t d; } blk_q6k;     /* as GGUF */
typedef struct { uint16_t d; int8_t qs[32]; } blk_q80;                                 /* as GGUF */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } blk_q50;                 /* as GGUF */
_Static_assert(sizeof(blk_q4k) == 148 && sizeof(blk_q6k) == 210, "K-quant block sizes");
_Static_assert(sizeof(blk_q80) == 34 && sizeof(blk_q50) == 22, "32-block sizes");

int kq_abi_version(void) { return 1; }

static int block_values(int type) { return type == KQ_Q4_K || type == KQ_Q6_K ? 256 : 32; }
static size_t block_bytes(int type) {
    switch (type) {
    case KQ_Q4_K: return sizeof(blk_q4k);
    case KQ_Q6_K: return sizeof(blk_q6k);
    case KQ_Q8_0: return sizeof(blk_q80);
    case KQ_Q5_0: return sizeof(blk_q50);
    }
    return 0;
}
static float h2f(uint16_t h) { return _cvtsh_ss(h); }

/* ---- activations --------------------------------------------------------------------------- */

/* One token: x[K] -> q[K] int8, d[K/QB] scales, s[K/16] sums of 16 quantized values. */
static void quantize_act(const float *x, int K, int QB, int8_t *q, float *d, int16_t *s) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        __m256 vmax = _mm256_setzero_ps();
        for (int k = 0; k < QB; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(signbit, _mm256_loadu_ps(xb + k)));
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, vmax);
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        d[b] = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < QB; k += 32) { /* round to nearest even, |v| <= 127 */
            __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), inv));
            __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), inv));
            __m256i v2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 16), inv));
            __m256i v3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 24), inv));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));
            _mm256_storeu_si256((__m256i *)(q + b * QB + k), _mm256_permutevar8x32_epi32(p, perm));
        }
    }
    for (int g = 0; g < K / 16; g++) {
        int sum = 0;
        for (int i = 0; i < 16; i++) sum += q[g * 16 + i];
        s[g] = (int16_t)sum;
    }
}

/* ---- helpers --------------------------------------------------------------------------------- */

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* shuffle_epi8 masks broadcasting int16 lane j of each 128-bit half to the whole half. */
static const int8_t BCAST16[8][32] __attribute__((aligned(32))) = {
#define B(j) {2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, \
              2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1}
    B(0), B(1), B(2), B(3), B(4), B(5), B(6), B(7)
#undef B
};
/* Q6_K: low half broadcasts int16 lane 2i, high half lane 2i + 1 (the two 16-value sub-blocks of
 * a 32-value chunk). */
static const int8_t PAIR16[4][32] __attribute__((aligned(32))) = {
#define P(i) {4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, 4*i, 4*i+1, \
              4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3, 4*i+2, 4*i+3}
    P(0), P(1), P(2), P(3)
#undef P
};

INLINE __m256i bcast(__m256i v, const int8_t *mask) { return _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)mask)); }

/* Activations of a call: tokens t at q + t*ldx, scales d + t*nd, sums s + t*ns. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *s;
    size_t ldx, nd, ns;
} acts_t;

/* ---- Q4_K: out[t][r] = x_t . w_r over nb super-blocks ------------------------------------------ */

INLINE void q4k_tile(const acts_t *A, int t0, const blk_q4k *w, int nb, int MT, int NR, int pf, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 accf[4][4];
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) accf[t][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (pf) /* the tile's rows are adjacent: sweep NR blocks' worth ahead each step */
            for (int j = 0; j < NR * (int)sizeof(blk_q4k); j += 64)
                _mm_prefetch((const char *)w + (size_t)b * NR * sizeof(blk_q4k) + KQ_PF_DIST + j, _MM_HINT_T0);
        __m256i acci[4][4], sc[4];
        for (int t = 0; t < MT; t++)
            for (int r = 0; r < NR; r++) acci[t][r] = _mm256_setzero_si256();
        for (int r = 0; r < NR; r++)
            sc[r] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)w[(size_t)r * nb + b].sc)));
        for (int p = 0; p < 4; p++) { /* 64 values: low nibbles sub-block 2p, high 2p + 1 */
            __m256i lo[4], hi[4];
            for (int r = 0; r < NR; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w[(size_t)r * nb + b].qs + 32 * p));
                lo[r] = _mm256_and_si256(v, m4);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for (int t = 0; t < MT; t++) {
                const int8_t *a = A->q + (size_t)(t0 + t) * A->ldx + b * 256 + 64 * p;
                const __m256i a0 = _mm256_loadu_si256((const __m256i *)a);
                const __m256i a1 = _mm256_loadu_si256((const __m256i *)(a + 32));
                for (int r = 0; r < NR; r++) {
                    __m256i x0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], a0), bcast(sc[r], BCAST16[2 * p]));
                    __m256i x1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], a1), bcast(sc[r], BCAST16[2 * p + 1]));
                    acci[t][r] = _mm256_add_epi32(acci[t][r], _mm256_add_epi32(x0, x1));
                }
            }
        }
        for (int r = 0; r < NR; r++) {
            const blk_q4k *blk = w + (size_t)r * nb + b;
            /* mins per 16-value group: m0 m0 m1 m1 ... m7 m7 */
            const __m128i m8 = _mm_loadl_epi64((const __m128i *)blk->m);
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
            const float d = h2f(blk->d), dmin = h2f(blk->dmin);
            for (int t = 0; t < MT; t++) {
                const size_t tt = (size_t)(t0 + t);
                const float da = A->d[tt * A->nd + b];
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(A->s + tt * A->ns + 16 * b));
                accf[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acci[t][r]), _mm256_set1_ps(d * da), accf[t][r]);
                accf[t][r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sums, mins)), _mm256_set1_ps(dmin * da), accf[t][r]);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) out[t * 4 + r] = hsum_ps(accf[t][r]);
}

/* Prefill tile for Q4_K, 4 tokens x 3 rows, one super-block, in assembly (intrinsics spill the 12
 * accumulators). ymm0-11 accumulate acc[t][r] (lane-for-lane the sums of q4k_tile), ymm12/13 hold
 * a row's low/high nibbles of 64 values, ymm14 a sub-block scale (int16 broadcast), ymm15 the
 * products; the activations are maddubs' memory operand. sc16: the rows' 8 scales as int16. */
static void q4k_sb4x3_asm(const int8_t *const x[4], const uint8_t *const q[3], const int16_t *sc16,
                          __m256i out[12]) {
    static const uint8_t M4[32] __attribute__((aligned(32))) = {
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};
    /* one token: products of 32 values (activations at XO of XP) with QR, scaled, into ACC */
#define KQ_MAC(XO, QR, XP, ACC)                                                                \
    "vpmaddubsw " XO "(%[" XP "]), %%" QR ", %%ymm15\n\t"                                      \
    "vpmaddwd %%ymm14, %%ymm15, %%ymm15\n\t"                                                   \
    "vpaddd %%ymm15, %%" ACC ", %%" ACC "\n\t"
    /* row R (pointer WP, accumulators A0..A3 for tokens 0..3), values 64p..64p+63 */
#define KQ_ROW(P, WP, SO_LO, SO_HI, A0, A1, A2, A3)                                            \
    "vmovdqu " #P "*32(%[" WP "]), %%ymm12\n\t"                                                \
    "vpsrlw $4, %%ymm12, %%ymm13\n\t"                                                          \
    "vpand %[m4], %%ymm12, %%ymm12\n\t"                                                        \
    "vpbroadcastw " SO_LO "(%[sc]), %%ymm14\n\t"                                               \
    KQ_MAC(#P "*64", "ymm12", "x0", A0) KQ_MAC(#P "*64", "ymm12", "x1", A1)                    \
    KQ_MAC(#P "*64", "ymm12", "x2", A2) KQ_MAC(#P "*64", "ymm12", "x3", A3)                    \
    "vpand %[m4], %%ymm13, %%ymm13\n\t"                                                        \
    "vpbroadcastw " SO_HI "(%[sc]), %%ymm14\n\t"                                               \
    KQ_MAC(#P "*64+32", "ymm13", "x0", A0) KQ_MAC(#P "*64+32", "ymm13", "x1", A1)              \
    KQ_MAC(#P "*64+32", "ymm13", "x2", A2) KQ_MAC(#P "*64+32", "ymm13", "x3", A3)
    /* sub-block 2p of row r: scale at byte 2*(8r + 2p) */
#define KQ_P(P)                                                                                \
    KQ_ROW(P, "w0", #P "*4", #P "*4+2", "ymm0", "ymm3", "ymm6", "ymm9")                        \
    KQ_ROW(P, "w1", "16+" #P "*4", "18+" #P "*4", "ymm1", "ymm4", "ymm7", "ymm10")             \
    KQ_ROW(P, "w2", "32+" #P "*4", "34+" #P "*4", "ymm2", "ymm5", "ymm8", "ymm11")
    __asm__ volatile(
        TILE12_ZERO
        KQ_P(0) KQ_P(1) KQ_P(2) KQ_P(3)
        TILE12_STORE
        :
        : [x0] "r"(x[0]), [x1] "r"(x[1]), [x2] "r"(x[2]), [x3] "r"(x[3]), [w0] "r"(q[0]),
          [w1] "r"(q[1]), [w2] "r"(q[2]), [sc] "r"(sc16), [out] "r"(out), [m4] "m"(*(const __m256i *)M4)
        : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#undef KQ_MAC
#undef KQ_ROW
#undef KQ_P
}

/* The Q4_K prefill tile, 4 tokens x 3 rows: q4k_tile's sums and float steps, the integer part of
 * each super-block in q4k_sb4x3_asm. */
static void q4k_tile4x3(const acts_t *A, int t0, const blk_q4k *w, int nb, float *out) {
    __m256 accf[4][3];
    __m256i acci[12] __attribute__((aligned(32)));
    int16_t sc16[24] __attribute__((aligned(32)));
    for (int t = 0; t < 4; t++)
        for (int r = 0; r < 3; r++) accf[t][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *x[4];
        const uint8_t *q[3];
        for (int t = 0; t < 4; t++) x[t] = A->q + (size_t)(t0 + t) * A->ldx + b * 256;
        for (int r = 0; r < 3; r++) {
            const blk_q4k *blk = w + (size_t)r * nb + b;
            q[r] = blk->qs;
            _mm_store_si128((__m128i *)(sc16 + 8 * r), _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)blk->sc)));
        }
        q4k_sb4x3_asm(x, q, sc16, acci);
        /* the float steps of q4k_tile, with d * da and dmin * da as vector products (same values) */
        __m256 da[4];
        __m256i sums[4];
        for (int t = 0; t < 4; t++) {
            const size_t tt = (size_t)(t0 + t);
            da[t] = _mm256_broadcast_ss(A->d + tt * A->nd + b);
            sums[t] = _mm256_loadu_si256((const __m256i *)(A->s + tt * A->ns + 16 * b));
        }
        for (int r = 0; r < 3; r++) {
            const blk_q4k *blk = w + (size_t)r * nb + b;
            const __m128i m8 = _mm_loadl_epi64((const __m128i *)blk->m);
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
            const __m256 d = _mm256_set1_ps(h2f(blk->d)), dmin = _mm256_set1_ps(h2f(blk->dmin));
            for (int t = 0; t < 4; t++) {
                accf[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acci[3 * t + r]), _mm256_mul_ps(d, da[t]), accf[t][r]);
                accf[t][r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sums[t], mins)), _mm256_mul_ps(dmin, da[t]), accf[t][r]);
            }
        }
    }
    for (int t = 0; t < 4; t++)
        for (int r = 0; r < 3; r++) out[t * 4 + r] = hsum_ps(accf[t][r]);
}

/* ---- Q6_K ------------------------------------------------------------------------------------- */

INLINE void q6k_tile(const acts_t *A, int t0, const blk_q6k *w, int nb, int MT, int NR, int pf, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 accf[4][4];
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) accf[t][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (pf)
            for (int j = 0; j < NR * (int)sizeof(blk_q6k); j += 64)
                _mm_prefetch((const char *)w + (size_t)b * NR * sizeof(blk_q6k) + KQ_PF_DIST + j, _MM_HINT_T0);
        __m256i acci[4][4];
        for (int t = 0; t < MT; t++)
            for (int r = 0; r < NR; r++) acci[t][r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) { /* 128 values: ql[64h..], qh[32h..], scales 8h..8h+7 */
            __m256i ql0[4], ql1[4], qh[4], sc[4];
            for (int r = 0; r < NR; r++) {
                const blk_q6k *blk = w + (size_t)r * nb + b;
                ql0[r] = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h));
                ql1[r] = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h + 32));
                qh[r] = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
                sc[r] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(blk->sc + 8 * h))));
            }
            for (int i = 0; i < 4; i++) { /* values 128h + 32i .. +31 */
                __m256i q[4], s[4];
                for (int r = 0; r < NR; r++) {
                    __m256i lo, hb;
                    switch (i) {
                    case 0: lo = _mm256_and_si256(ql0[r], m4); hb = _mm256_slli_epi16(qh[r], 4); break;
                    case 1: lo = _mm256_and_si256(ql1[r], m4); hb = _mm256_slli_epi16(qh[r], 2); break;
                    case 2: lo = _mm256_and_si256(_mm256_srli_epi16(ql0[r], 4), m4); hb = qh[r]; break;
                    default: lo = _mm256_and_si256(_mm256_srli_epi16(ql1[r], 4), m4); hb = _mm256_srli_epi16(qh[r], 2); break;
                    }
                    q[r] = _mm256_or_si256(lo, _mm256_and_si256(hb, m30));
                    s[r] = bcast(sc[r], PAIR16[i]);
                }
                for (int t = 0; t < MT; t++) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(A->q + (size_t)(t0 + t) * A->ldx + b * 256 + 128 * h + 32 * i));
                    for (int r = 0; r < NR; r++)
                        acci[t][r] = _mm256_add_epi32(acci[t][r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], a), s[r]));
                }
            }
        }
        for (int r = 0; r < NR; r++) {
            const blk_q6k *blk = w + (size_t)r * nb + b;
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc));
            const float d = h2f(blk->d);
            for (int t = 0; t < MT; t++) {
                const size_t tt = (size_t)(t0 + t);
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(A->s + tt * A->ns + 16 * b));
                const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(sums, sc16), 5); /* 32 * sc . asum */
                accf[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acci[t][r], off)),
                                             _mm256_set1_ps(d * A->d[tt * A->nd + b]), accf[t][r]);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) out[t * 4 + r] = hsum_ps(accf[t][r]);
}

/* Prefill tile for Q6_K, 4 tokens x 3 rows, one super-block, in assembly like q4k_sb4x3_asm.
 * ymm0-11 accumulate acc[t][r] (lane for lane the sums of q6k_tile, before its -32 offset),
 * ymm12 holds a row's 32 6-bit values (4 low bits from ql, 2 high from qh), ymm13 their scales
 * (sc: per row 8 vectors, low half the first 16-value sub-block's scale, high half the second's),
 * ymm14/15 the products. x: the tokens' activations of the super-block, q: the rows' blocks. */
static void q6k_sb4x3_asm(const int8_t *const x[4], const blk_q6k *const q[3], const __m256i *sc,
                          __m256i out[12]) {
    static const uint8_t M[2][32] __attribute__((aligned(32))) = {
        {15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
         15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15},
        {48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48,
         48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48}};
    /* one token: products of 32 values (activations at XO of XP) with ymm12, scaled, into ACC */
#define KQ_MAC6(XO, XP, T, ACC)                                                                \
    "vpmaddubsw " XO "(%[" XP "]), %%ymm12, %%" T "\n\t"                                       \
    "vpmaddwd %%ymm13, %%" T ", %%" T "\n\t"                                                   \
    "vpaddd %%" T ", %%" ACC ", %%" ACC "\n\t"
    /* row WP, values 32c..32c+31 of half H (c = 4H + I): low bits at LO (shifted by LOSH), high
     * bits at qh (128 + 32H, moved into bits 4-5 by QHSH), scales vector SC */
#define KQ_ROW6(H, I, LO, LOSH, QHSH, WP, SC, A0, A1, A2, A3)                                  \
    "vmovdqu 64*" #H "+" LO "(%[" WP "]), %%ymm12\n\t" LOSH                                    \
    "vpand %[m4], %%ymm12, %%ymm12\n\t"                                                        \
    "vmovdqu 128+32*" #H "(%[" WP "]), %%ymm15\n\t" QHSH                                       \
    "vpand %[m30], %%ymm15, %%ymm15\n\t"                                                       \
    "vpor %%ymm15, %%ymm12, %%ymm12\n\t"                                                       \
    "vmovdqa " SC "*256+32*(4*" #H "+" #I ")(%[sc]), %%ymm13\n\t"                              \
    KQ_MAC6("128*" #H "+32*" #I, "x0", "ymm14", A0) KQ_MAC6("128*" #H "+32*" #I, "x1", "ymm15", A1) \
    KQ_MAC6("128*" #H "+32*" #I, "x2", "ymm14", A2) KQ_MAC6("128*" #H "+32*" #I, "x3", "ymm15", A3)
#define KQ_CHUNK6(H, I, LO, LOSH, QHSH)                                                        \
    KQ_ROW6(H, I, LO, LOSH, QHSH, "w0", "0", "ymm0", "ymm3", "ymm6", "ymm9")                  \
    KQ_ROW6(H, I, LO, LOSH, QHSH, "w1", "1", "ymm1", "ymm4", "ymm7", "ymm10")                 \
    KQ_ROW6(H, I, LO, LOSH, QHSH, "w2", "2", "ymm2", "ymm5", "ymm8", "ymm11")
    /* the four 32-value chunks of a half, as q6k_tile unpacks them */
#define KQ_HALF6(H)                                                                            \
    KQ_CHUNK6(H, 0, "0", "", "vpsllw $4, %%ymm15, %%ymm15\n\t")                                \
    KQ_CHUNK6(H, 1, "32", "", "vpsllw $2, %%ymm15, %%ymm15\n\t")                               \
    KQ_CHUNK6(H, 2, "0", "vpsrlw $4, %%ymm12, %%ymm12\n\t", "")                                \
    KQ_CHUNK6(H, 3, "32", "vpsrlw $4, %%ymm12, %%ymm12\n\t", "vpsrlw $2, %%ymm15, %%ymm15\n\t")
    __asm__ volatile(
        TILE12_ZERO
        KQ_HALF6(0) KQ_HALF6(1)
        TILE12_STORE
        :
        : [x0] "r"(x[0]), [x1] "r"(x[1]), [x2] "r"(x[2]), [x3] "r"(x[3]), [w0] "r"(q[0]),
          [w1] "r"(q[1]), [w2] "r"(q[2]), [sc] "r"(sc), [out] "r"(out),
          [m4] "m"(*(const __m256i *)M[0]), [m30] "m"(*(const __m256i *)M[1])
        : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#undef KQ_MAC6
#undef KQ_ROW6
#undef KQ_CHUNK6
#undef KQ_HALF6
}

/* The Q6_K prefill tile, 4 tokens x 3 rows: q6k_tile's sums and float steps, the integer part of
 * each super-block in q6k_sb4x3_asm. */
static void q6k_tile4x3(const acts_t *A, int t0, const blk_q6k *w, int nb, float *out) {
    __m256 accf[4][3];
    __m256i acci[12] __attribute__((aligned(32)));
    __m256i sc[3][8] __attribute__((aligned(32)));
    for (int t = 0; t < 4; t++)
        for (int r = 0; r < 3; r++) accf[t][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *x[4];
        const blk_q6k *q[3];
        for (int t = 0; t < 4; t++) x[t] = A->q + (size_t)(t0 + t) * A->ldx + b * 256;
        for (int r = 0; r < 3; r++) {
            q[r] = w + (size_t)r * nb + b;
            for (int h = 0; h < 2; h++) {
                const __m256i s = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(q[r]->sc + 8 * h))));
                for (int i = 0; i < 4; i++) sc[r][4 * h + i] = bcast(s, PAIR16[i]);
            }
        }
        q6k_sb4x3_asm(x, q, sc[0], acci);
        for (int r = 0; r < 3; r++) {
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q[r]->sc));
            const __m256 d = _mm256_set1_ps(h2f(q[r]->d));
            for (int t = 0; t < 4; t++) {
                const size_t tt = (size_t)(t0 + t);
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(A->s + tt * A->ns + 16 * b));
                const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(sums, sc16), 5); /* 32 * sc . asum */
                accf[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acci[3 * t + r], off)),
                                             _mm256_mul_ps(d, _mm256_broadcast_ss(A->d + tt * A->nd + b)), accf[t][r]);
            }
        }
    }
    for (int t = 0; t < 4; t++)
        for (int r = 0; r < 3; r++) out[t * 4 + r] = hsum_ps(accf[t][r]);
}

/* ---- Q8_0 / Q5_0: 32-value blocks, signed weights ------------------------------------------- */

/* The 32 signed weights of a block. */
INLINE __m256i q80_values(const blk_q80 *blk) { return _mm256_loadu_si256((const __m256i *)blk->qs); }

INLINE __m256i q50_values(const blk_q50 *blk) {
    const __m128i n = _mm_loadu_si128((const __m128i *)blk->qs);
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(n, 4), n), _mm256_set1_epi8(0x0F));
    uint32_t bits;
    memcpy(&bits, blk->qh, 4);
    /* byte i of the 32 gets bit i of qh: spread byte i/8 of qh to bytes i, then test bit i%8 */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    /* value = nibble + 16 * bit - 16: nibble - 16 (= nibble | 0xF0) where the bit is clear */
    return _mm256_or_si256(nib, _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0)));
}

INLINE void q32_tile(const acts_t *A, int t0, const void *wv, int type, int nb, int MT, int NR, int pf, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    const size_t bb = block_bytes(type);
    const char *w = (const char *)wv;
    __m256 accf[4][4];
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) accf[t][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (pf && (b & 1) == 0)
            for (int j = 0; j < NR * 2 * (int)bb; j += 64)
                _mm_prefetch(w + (size_t)b * NR * bb + KQ_PF_DIST + j, _MM_HINT_T0);
        __m256i v[4], av[4];
        float d[4];
        for (int r = 0; r < NR; r++) {
            const char *blk = w + ((size_t)r * nb + b) * bb;
            v[r] = type == KQ_Q8_0 ? q80_values((const blk_q80 *)blk) : q50_values((const blk_q50 *)blk);
            av[r] = _mm256_sign_epi8(v[r], v[r]);
            d[r] = h2f(*(const uint16_t *)blk);
        }
        for (int t = 0; t < MT; t++) {
            const size_t tt = (size_t)(t0 + t);
            const __m256i a = _mm256_loadu_si256((const __m256i *)(A->q + tt * A->ldx + b * 32));
            const float da = A->d[tt * A->nd + b];
            for (int r = 0; r < NR; r++) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(av[r], _mm256_sign_epi8(a, v[r])), ones);
                accf[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[r] * da), accf[t][r]);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) out[t * 4 + r] = hsum_ps(accf[t][r]);
}

/* ---- dispatch ---------------------------------------------------------------------------------- */

/* One tile of MT tokens x NR rows starting at row pointer w (rows adjacent, nb blocks each). */
#define TILE_FN(NAME, MT, NR, PF)                                                                  \
    static void NAME(const acts_t *A, int t0, const void *w, int type, int nb, float *out) {       \
        switch (type) {                                                                            \
        case KQ_Q4_K: q4k_tile(A, t0, (const blk_q4k *)w, nb, MT, NR, PF, out); break;             \
        case KQ_Q6_K: q6k_tile(A, t0, (const blk_q6k *)w, nb, MT, NR, PF, out); break;             \
        case KQ_Q8_0: q32_tile(A, t0, w, KQ_Q8_0, nb, MT, NR, PF, out); break;                     \
        default: q32_tile(A, t0, w, KQ_Q5_0, nb, MT, NR, PF, out); break;                          \
        }                                                                                          \
    }
#ifndef PF_MT
#define PF_MT 4 /* prefill: tokens per tile */
#endif
#ifndef PF_NR
#define PF_NR 2 /* prefill: weight rows per tile */
#endif
TILE_FN(tile_1x4, 1, 4, 1)
TILE_FN(tile_pf, PF_MT, PF_NR, 0)
TILE_FN(tile_1x1, 1, 1, 0)
TILE_FN(tile_2x1, 2, 1, 0)
TILE_FN(tile_3x1, 3, 1, 0)
TILE_FN(tile_4x1, 4, 1, 0)

typedef void (*tile_fn)(const acts_t *, int, const void *, int, int, float *);
static const tile_fn TAIL[5] = {0, tile_1x1, tile_2x1, tile_3x1, tile_4x1}; /* 1..4 tokens x 1 row */

typedef struct {
    acts_t A;
    const float *x;
    int M, K, N, type, qb, chunk, nb;
    size_t row_bytes, ldy;
    const uint8_t *w;
    const float *bias;
    float *y;
} call_t;

INLINE void store(const call_t *c, const float *acc, int m0, int MT, int n0, int NR) {
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++)
            c->y[(size_t)(m0 + t) * c->ldy + n0 + r] = acc[t * 4 + r] + (c->bias ? c->bias[n0 + r] : 0.0f);
}

/* Output rows [n0, n1) for all tokens. */
static void compute_rows(const call_t *c, int n0, int n1) {
    float acc[16];
    const int nb = c->nb;
    if (c->M == 1) {
        int n = n0;
        for (; n + 4 <= n1; n += 4) {
            tile_1x4(&c->A, 0, c->w + n * c->row_bytes, c->type, nb, acc);
            store(c, acc, 0, 1, n, 4);
        }
        for (; n < n1; n++) {
            tile_1x1(&c->A, 0, c->w + n * c->row_bytes, c->type, nb, acc);
            store(c, acc, 0, 1, n, 1);
        }
        return;
    }
    /* token blocks whose activations stay in L2 (~192 KiB) */
    int mb = (int)((192 * 1024) / c->A.ldx);
    mb = mb < 4 ? 4 : mb & ~3;
    for (int m0 = 0; m0 < c->M; m0 += mb) {
        const int m1 = m0 + mb < c->M ? m0 + mb : c->M;
        int n = n0;
        if (c->type == KQ_Q4_K || c->type == KQ_Q6_K) /* 4 x 3 tiles in assembly, then the 4 x 2 ones below */
            for (; n + 3 <= n1; n += 3) {
                const uint8_t *wr = c->w + n * c->row_bytes;
                int m = m0;
                for (; m + 4 <= m1; m += 4) {
                    if (c->type == KQ_Q4_K)
                        q4k_tile4x3(&c->A, m, (const blk_q4k *)wr, nb, acc);
                    else
                        q6k_tile4x3(&c->A, m, (const blk_q6k *)wr, nb, acc);
                    store(c, acc, m, 4, n, 3);
                }
                for (; m < m1; m++)
                    for (int r = 0; r < 3; r++) {
                        tile_1x1(&c->A, m, wr + r * c->row_bytes, c->type, nb, acc);
                        store(c, acc, m, 1, n + r, 1);
                    }
            }
        for (; n + PF_NR <= n1; n += PF_NR) { /* full row tiles: PF_MT tokens at a time, then 1 */
            const uint8_t *wr = c->w + n * c->row_bytes;
            int m = m0;
            for (; m + PF_MT <= m1; m += PF_MT) {
                tile_pf(&c->A, m, wr, c->type, nb, acc);
                store(c, acc, m, PF_MT, n, PF_NR);
            }
            for (; m < m1; m++)
                for (int r = 0; r < PF_NR; r++) {
                    tile_1x1(&c->A, m, wr + r * c->row_bytes, c->type, nb, acc);
                    store(c, acc, m, 1, n + r, 1);
                }
        }
        for (; n < n1; n++) /* remaining rows one at a time, up to 4 tokens */
            for (int m = m0; m < m1; m += 4) {
                const int mt = m1 - m < 4 ? m1 - m : 4;
                TAIL[mt](&c->A, m, c->w + n * c->row_bytes, c->type, nb, acc);
                store(c, acc, m, mt, n, 1);
            }
    }
}

static void quantize_chunk(void *p, int i) {
    const call_t *c = (const call_t *)p;
    const int m0 = i * 8, m1 = m0 + 8 < c->M ? m0 + 8 : c->M;
    for (int m = m0; m < m1; m++)
        quantize_act(c->x + (size_t)m * c->K, c->K, c->qb, (int8_t *)c->A.q + m * c->A.ldx,
                     (float *)c->A.d + m * c->A.nd, (int16_t *)c->A.s + m * c->A.ns);
}

static void compute_chunk(void *p, int i) {
    const call_t *c = (const call_t *)p;
    const int n0 = i * c->chunk, n1 = n0 + c->chunk < c->N ? n0 + c->chunk : c->N;
    compute_rows(c, n0, n1);
}

/* y[m][n] (row stride ldy) = x[M][K] . W[n] (+ bias[n]) for the N rows of W (GGUF blocks of
 * `type`, rows adjacent, K / block values blocks each). Returns 0, or -1 for a bad type or K. */
int kq_linear(int type, const float *x, int M, int K, const void *w, int N, const float *bias, float *y,
              long ldy, int threads) {
    const int qb = block_values(type);
    if (!block_bytes(type) || K % qb) return -1;
    if (M <= 0 || N <= 0) return 0;
    call_t c = {0};
    c.A.ldx = ((size_t)K + 63) & ~(size_t)63;
    c.A.nd = (size_t)K / qb;
    c.A.ns = (size_t)K / 16;
    int8_t *q = (int8_t *)aligned_alloc(64, (size_t)M * c.A.ldx);
    float *d = (float *)malloc(sizeof(float) * (size_t)M * c.A.nd);
    int16_t *s = (int16_t *)malloc(sizeof(int16_t) * (size_t)M * c.A.ns);
    if (!q || !d || !s) {
        free(q), free(d), free(s);
        return -2;
    }
    c.A.q = q, c.A.d = d, c.A.s = s;
    c.x = x, c.M = M, c.K = K, c.N = N, c.type = type, c.qb = qb, c.nb = K / qb;
    c.row_bytes = (size_t)c.nb * block_bytes(type), c.ldy = (size_t)ldy;
    c.w = (const uint8_t *)w, c.bias = bias, c.y = y;
    if (threads < 1) threads = 1;
    if ((double)M * N * K < 65536.0) threads = 1;
    /* chunks of rows (multiples of 4), first come first served: a busy core takes fewer */
    int chunk = N / (threads * 8);
    if (M > 1 && (size_t)chunk * c.row_bytes > 96 * 1024) chunk = (int)(96 * 1024 / c.row_bytes);
    chunk = chunk < 4 ? 4 : (chunk > 256 ? 256 : chunk & ~3);
    c.chunk = chunk;
    parallel_chunks(quantize_chunk, &c, (M + 7) / 8, threads);
    parallel_chunks(compute_chunk, &c, (N + chunk - 1) / chunk, threads);
    free(q), free(d), free(s);
    return 0;
}

/* For tests: the activation quantization of M rows (q [M][K], d [M][K/qb], s [M][K/16]). */
void kq_quantize_rows(const float *x, int M, int K, int qb, int8_t *q, float *d, int16_t *s) {
    for (int m = 0; m < M; m++)
        quantize_act(x + (size_t)m * K, K, qb, q + (size_t)m * K, d + (size_t)m * (K / qb), s + (size_t)m * (K / 16));
}

/* ---- dequantization (embedding lookups, tests) ------------------------------------------------- */

static void dequant_row(int type, const uint8_t *row, int K, float *y) {
    const int nb = K / block_values(type);
    for (int b = 0; b < nb; b++) {
        if (type == KQ_Q4_K) {
            const blk_q4k *blk = (const blk_q4k *)row + b;
            const float d = h2f(blk->d), dmin = h2f(blk->dmin);
            for (int p = 0; p < 4; p++) {
                const float d1 = d * blk->sc[2 * p], m1 = dmin * blk->m[2 * p];
                const float d2 = d * blk->sc[2 * p + 1], m2 = dmin * blk->m[2 * p + 1];
                for (int l = 0; l < 32; l++) {
                    y[64 * p + l] = d1 * (blk->qs[32 * p + l] & 0xF) - m1;
                    y[64 * p + 32 + l] = d2 * (blk->qs[32 * p + l] >> 4) - m2;
                }
            }
            y += 256;
        } else if (type == KQ_Q6_K) {
            const blk_q6k *blk = (const blk_q6k *)row + b;
            const float d = h2f(blk->d);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = blk->ql + 64 * h, *qh = blk->qh + 32 * h;
                const int8_t *sc = blk->sc + 8 * h;
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    y[128 * h + l] = d * sc[is] * ((int)((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                    y[128 * h + l + 32] = d * sc[is + 2] * ((int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    y[128 * h + l + 64] = d * sc[is + 4] * ((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    y[128 * h + l + 96] = d * sc[is + 6] * ((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            }
            y += 256;
        } else if (type == KQ_Q8_0) {
            const blk_q80 *blk = (const blk_q80 *)row + b;
            const float d = h2f(blk->d);
            for (int l = 0; l < 32; l++) y[l] = d * blk->qs[l];
            y += 32;
        } else {
            const blk_q50 *blk = (const blk_q50 *)row + b;
            const float d = h2f(blk->d);
            uint32_t qh;
            memcpy(&qh, blk->qh, 4);
            for (int l = 0; l < 16; l++) {
                y[l] = d * ((int)((blk->qs[l] & 0xF) | (((qh >> l) & 1) << 4)) - 16);
                y[l + 16] = d * ((int)((blk->qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16);
            }
            y += 32;
        }
    }
}

/* y[i][K] = row ids[i] of W (dequantized to float32). Returns -1 for a bad type or K. */
int kq_dequant_rows(int type, const void *w, int K, const int64_t *ids, int n, float *y) {
    if (!block_bytes(type) || K % block_values(type)) return -1;
    const size_t row_bytes = (size_t)(K / block_values(type)) * block_bytes(type);
    for (int i = 0; i < n; i++) dequant_row(type, (const uint8_t *)w + (size_t)ids[i] * row_bytes, K, y + (size_t)i * K);
    return 0;
}
