/* int8 x int8 linear layer for AVX2 CPUs: y = x @ W.T (+ b), W int8 per output row (7-bit).
 *
 * Each activation row m (token) is quantized on its own, asymmetrically, to u8:
 *   u = clamp(round(x / s) + z, 0, 255), s = (max(x, 0) - min(x, 0)) / 255, z = round(-min / s)
 * (all 256 levels span the row's own range: LLM activations have one-sided outliers, where a
 * symmetric absmax scale would waste half the levels). _mm256_maddubs_epi16(u8 x, s8 w) adds
 * pairs of products in int16: with |w| <= 63 a pair is at most 2 * 255 * 63 = 32130, so it
 * cannot saturate; _mm256_madd_epi16 with ones widens to int32 and the dot products accumulate
 * exactly in int32. The zero point comes off with the weight's row sum:
 *   y[m][n] = (acc[m][n] - z[m] * rowsum(w[n])) * s[m] * w_scale[n] (+ bias[n])
 *
 * Register tiles: 4 tokens x 3 weight rows (12 int32 accumulators) for prefills, 1 token x 4
 * rows for decoding (memory bound: 4 weight streams at once). Tokens are blocked so a block of
 * quantized activations stays in L2 while the weight rows of a tile stay in L1. Output rows are
 * handed out in chunks to the caller and a small pool of helper threads (see parallel_chunks).
 *
 * Plain C, no torch headers: built by omnistream/kernels/cpu/__init__.py with
 * gcc -O3 -mavx2 -mfma -mf16c -pthread -shared -fPIC.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tile_asm.h"

#define INLINE static inline __attribute__((always_inline))

/* Tile sizes (the defaults are measured choices; -D overrides them for experiments). */
#ifndef DEC_NR
#define DEC_NR 4 /* decoding: weight rows per tile */
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048 /* decoding: software prefetch distance along the weight */
#endif
#ifndef PF_MT
#define PF_MT 4 /* prefill: tokens per tile */
#endif
#ifndef PF_NR
#define PF_NR 3 /* prefill: weight rows per tile */
#endif

int int8_gemm_abi_version(void) { return 2; }

/* Row x -> u8 q (see the top of the file); returns the scale, the zero point in *zero. */
static float quantize_row(const float *x, int K, uint8_t *q, int32_t *zero) {
    __m256 vmin = _mm256_setzero_ps(), vmax = _mm256_setzero_ps(); /* the range includes 0 */
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        vmin = _mm256_min_ps(vmin, v);
        vmax = _mm256_max_ps(vmax, v);
    }
    float lo[8], hi[8];
    _mm256_storeu_ps(lo, vmin);
    _mm256_storeu_ps(hi, vmax);
    float mn = 0.0f, mx = 0.0f;
    for (int i = 0; i < 8; i++) {
        mn = lo[i] < mn ? lo[i] : mn;
        mx = hi[i] > mx ? hi[i] : mx;
    }
    for (; k < K; k++) {
        mn = x[k] < mn ? x[k] : mn;
        mx = x[k] > mx ? x[k] : mx;
    }
    const float range = mx - mn;
    const float inv = range > 0.0f ? 255.0f / range : 0.0f;
    const int32_t z = (int32_t)lrintf(-mn * inv);
    *zero = z;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i vz = _mm256_set1_epi32(z);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i a = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv)), vz);
        __m256i b = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv)), vz);
        __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv)), vz);
        __m256i d = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv)), vz);
        __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), perm));
    }
    for (; k < K; k++) {
        int v = (int)lrintf(x[k] * inv) + z;
        q[k] = (uint8_t)(v > 255 ? 255 : (v < 0 ? 0 : v));
    }
    return range / 255.0f;
}

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* acc[t][r] = sum_k xq[t][k] * w[r][k] over all K (u8 x s8, exact int32), for a tile of MT
 * tokens x NR rows. MT and NR are compile-time constants at every call site. */
INLINE void tile(const uint8_t *xq, size_t ldx, const int8_t *w, size_t ldw, int K, int MT, int NR,
                 int32_t *out /* [MT][4] */) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) acc[t][r] = _mm256_setzero_si256();
    const int K32 = K & ~31;
    for (int k = 0; k < K32; k += 32) {
        __m256i wv[4];
        for (int r = 0; r < NR; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w + r * ldw + k));
        for (int t = 0; t < MT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * ldx + k));
            for (int r = 0; r < NR; r++) {
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv[r]), ones);
                acc[t][r] = _mm256_add_epi32(acc[t][r], p);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) {
            int32_t s = hsum_epi32(acc[t][r]);
            for (int k = K32; k < K; k++) s += (int32_t)xq[t * ldx + k] * (int32_t)w[r * ldw + k];
            out[t * 4 + r] = s;
        }
}

INLINE void store(const int32_t *acc, int MT, int NR, int m0, int n0, const float *xs, const int32_t *xz,
                  const float *ws, const int32_t *rowsum, const float *bias, float *y, int N) {
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < NR; r++) {
            int n = n0 + r;
            int32_t a = acc[t * 4 + r] - xz[m0 + t] * rowsum[n];
            /* Explicit fmaf: every tile shape rounds alike (no compiler-chosen contraction), so a
             * token's output does not depend on which tile it fell in. */
            const float v = (float)a * xs[m0 + t];
            y[(size_t)(m0 + t) * N + n] = bias ? fmaf(v, ws[n], bias[n]) : v * ws[n];
        }
}

/* The prefill tile, 4 tokens x 3 rows over the first K32 (multiple of 32) columns, in assembly:
 * compilers spill some of the 12 accumulators when this is written with intrinsics. ymm0-11
 * accumulate, ymm12 holds int16 ones, ymm13 the activations, ymm14/15 the products. */
static void tile4x3_asm(const uint8_t *x, size_t ldx, const int8_t *w, size_t ldw, long K32, int32_t *out) {
    int32_t lanes[12 * 8] __attribute__((aligned(32)));
    const uint8_t *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    const int8_t *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw;
    long k = 0;
    __asm__ volatile(
        TILE12_ZERO
        "vpcmpeqw %%ymm12, %%ymm12, %%ymm12\n\t"
        "vpsrlw $15, %%ymm12, %%ymm12\n\t"
        "cmp %[kend], %[k]\n\t"
        "jge 2f\n\t"
        ".p2align 4\n"
        "1:\n\t"
#define ROW3(XP, A0, A1, A2)                                                                  \
        "vmovdqu (%[" XP "],%[k]), %%ymm13\n\t"                                               \
        "vpmaddubsw (%[w0],%[k]), %%ymm13, %%ymm14\n\t"                                       \
        "vpmaddubsw (%[w1],%[k]), %%ymm13, %%ymm15\n\t"                                       \
        "vpmaddwd %%ymm12, %%ymm14, %%ymm14\n\t"                                              \
        "vpmaddwd %%ymm12, %%ymm15, %%ymm15\n\t"                                              \
        "vpaddd %%ymm14, %%" A0 ", %%" A0 "\n\t"                                              \
        "vpaddd %%ymm15, %%" A1 ", %%" A1 "\n\t"                                              \
        "vpmaddubsw (%[w2],%[k]), %%ymm13, %%ymm14\n\t"                                       \
        "vpmaddwd %%ymm12, %%ymm14, %%ymm14\n\t"                                              \
        "vpaddd %%ymm14, %%" A2 ", %%" A2 "\n\t"
        ROW3("x0", "ymm0", "ymm1", "ymm2")
        ROW3("x1", "ymm3", "ymm4", "ymm5")
        ROW3("x2", "ymm6", "ymm7", "ymm8")
        ROW3("x3", "ymm9", "ymm10", "ymm11")
#undef ROW3
        "add $32, %[k]\n\t"
        "cmp %[kend], %[k]\n\t"
        "jl 1b\n"
        "2:\n\t"
        TILE12_STORE
        : [k] "+r"(k)
        : [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [w0] "r"(w0), [w1] "r"(w1),
          [w2] "r"(w2), [kend] "r"(K32), [out] "r"(lanes)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    for (int i = 0; i < 12; i++) {
        const __m256i v = _mm256_load_si256((const __m256i *)(lanes + 8 * i));
        out[(i / 3) * 4 + i % 3] = hsum_epi32(v);
    }
}

/* 4 x 3 tile including the K tail: the same contract as tile(). */
static inline void tile4x3(const uint8_t *xq, size_t ldx, const int8_t *w, size_t ldw, int K, int32_t *out) {
    const int K32 = K & ~31;
    tile4x3_asm(xq, ldx, w, ldw, K32, out);
    for (int k = K32; k < K; k++)
        for (int t = 0; t < 4; t++)
            for (int r = 0; r < 3; r++) out[t * 4 + r] += (int32_t)xq[t * ldx + k] * (int32_t)w[r * ldw + k];
}


/* Decoding (one token), DEC_NR rows at a time. The rows of a tile are adjacent in memory, so the
 * tiles sweep the weight linearly: a software prefetch PREFETCH_BYTES ahead of that sweep keeps
 * DRAM busy (the hardware prefetcher sees DEC_NR short streams per tile and starts late). */
INLINE void gemv_tile(const uint8_t *xq, const int8_t *w, size_t ldw, int K, int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[DEC_NR];
    for (int r = 0; r < DEC_NR; r++) acc[r] = _mm256_setzero_si256();
    const int K32 = K & ~31;
    const char *pf = (const char *)w + PREFETCH_BYTES;
    for (int k = 0; k < K32; k += 32) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
        for (int j = 0; j < DEC_NR * 32; j += 64) _mm_prefetch(pf + (size_t)k * DEC_NR + j, _MM_HINT_T0);
        for (int r = 0; r < DEC_NR; r++) {
            __m256i p = _mm256_maddubs_epi16(xv, _mm256_loadu_si256((const __m256i *)(w + r * ldw + k)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
        }
    }
    for (int r = 0; r < DEC_NR; r++) {
        int32_t s = hsum_epi32(acc[r]);
        for (int k = K32; k < K; k++) s += (int32_t)xq[k] * (int32_t)w[r * ldw + k];
        out[r] = s;
    }
}

#define TILE_CASE(MT_, NR_)                                                                   \
    case (MT_) * 8 + (NR_):                                                                   \
        tile(xq, ldx, w, ldw, K, MT_, NR_, acc);                                              \
        break;

/* One tile with runtime sizes (1..4 tokens, 1..4 rows): dispatches to the constant versions. */
static void tile_any(const uint8_t *xq, size_t ldx, const int8_t *w, size_t ldw, int K, int MT, int NR,
                     int32_t *acc) {
    switch (MT * 8 + NR) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3) TILE_CASE(2, 4)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 3) TILE_CASE(3, 4)
        TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(4, 3) TILE_CASE(4, 4)
    }
}


/* Output rows [n0, n1) for all M tokens. */
static void compute_rows(const uint8_t *xq, size_t ldx, const float *xs, const int32_t *xz, int M, int K, const int8_t *w,
                         const float *ws, const int32_t *rowsum, const float *bias, float *y, int N,
                         int n0, int n1) {
    const size_t ldw = (size_t)K;
    int32_t acc[16];
    if (M == 1) {
        int n = n0;
        for (; n + DEC_NR <= n1; n += DEC_NR) {
            gemv_tile(xq, w + n * ldw, ldw, K, acc);
            store(acc, 1, DEC_NR, 0, n, xs, xz, ws, rowsum, bias, y, N);
        }
        for (; n < n1; n += 4) {
            const int nr = n1 - n < 4 ? n1 - n : 4;
            tile_any(xq, ldx, w + n * ldw, ldw, K, 1, nr, acc);
            store(acc, 1, nr, 0, n, xs, xz, ws, rowsum, bias, y, N);
        }
        return;
    }
    /* Token blocks small enough to stay in L2 (~256 KiB of quantized activations). */
    int mb = (int)((256 * 1024) / ldx);
    mb = mb < 8 ? 8 : (mb & ~3);
    for (int m0 = 0; m0 < M; m0 += mb) {
        const int m1 = m0 + mb < M ? m0 + mb : M;
        int n = n0;
        for (; n < n1; n += PF_NR) {
            const int nr = n1 - n < PF_NR ? n1 - n : PF_NR;
            const int8_t *wr = w + n * ldw;
            /* The next triple's rows come from DRAM while this one is multiplied. */
            if (n + 2 * PF_NR <= n1)
                for (size_t off = 0; off < PF_NR * ldw; off += 64) _mm_prefetch((const char *)(wr + PF_NR * ldw + off), _MM_HINT_T0);
            int m = m0;
            if (nr == PF_NR) {
                for (; m + PF_MT <= m1; m += PF_MT) {
#if PF_MT == 4 && PF_NR == 3 && !defined(NO_ASM)
                    tile4x3(xq + m * ldx, ldx, wr, ldw, K, acc);
#else
                    tile(xq + m * ldx, ldx, wr, ldw, K, PF_MT, PF_NR, acc);
#endif
                    store(acc, PF_MT, PF_NR, m, n, xs, xz, ws, rowsum, bias, y, N);
                }
            }
            for (; m < m1; m += 4) {
                const int mt = m1 - m < 4 ? m1 - m : 4;
                tile_any(xq + m * ldx, ldx, wr, ldw, K, mt, nr, acc);
                store(acc, mt, nr, m, n, xs, xz, ws, rowsum, bias, y, N);
            }
        }
    }
}

#include "pool.h"

/* ---- the entry point ----------------------------------------------------------------------- */

typedef struct {
    const float *x;
    int M, K, N, chunk, rows_per_qchunk;
    size_t ldx;
    uint8_t *xq;
    float *xs;
    int32_t *xz;
    const int8_t *w;
    const float *ws, *bias;
    const int32_t *rowsum;
    float *y;
} call_t;

static void quantize_chunk(void *p, int c) {
    const call_t *a = (const call_t *)p;
    const int m0 = c * a->rows_per_qchunk;
    const int m1 = m0 + a->rows_per_qchunk < a->M ? m0 + a->rows_per_qchunk : a->M;
    for (int m = m0; m < m1; m++)
        a->xs[m] = quantize_row(a->x + (size_t)m * a->K, a->K, a->xq + m * a->ldx, a->xz + m);
}

static void compute_chunk(void *p, int c) {
    const call_t *a = (const call_t *)p;
    const int n0 = c * a->chunk, n1 = n0 + a->chunk < a->N ? n0 + a->chunk : a->N;
    compute_rows(a->xq, a->ldx, a->xs, a->xz, a->M, a->K, a->w, a->ws, a->rowsum, a->bias, a->y, a->N, n0, n1);
}

/* y[M][N] = x[M][K] @ w[N][K].T (+ bias): see the top of the file. */
void int8_linear(const float *x, int M, int K, const int8_t *w, const float *w_scale, const int32_t *w_rowsum,
                 const float *bias, float *y, int N, int threads) {
    if (M <= 0 || N <= 0) return;
    const size_t ldx = ((size_t)K + 63) & ~(size_t)63;
    uint8_t *xq = (uint8_t *)aligned_alloc(64, (size_t)M * ldx);
    float *xs = (float *)malloc(sizeof(float) * 2 * (size_t)M); /* scales, then zero points */
    if (!xq || !xs) { /* out of memory: NaNs rather than garbage */
        for (size_t i = 0; i < (size_t)M * N; i++) y[i] = NAN;
        free(xq);
        free(xs);
        return;
    }
    if (threads < 1) threads = 1;
    if ((double)M * N * K < 65536.0) threads = 1;
    /* Rows are handed out in chunks (multiples of 12, so of every tile's row count), first come
     * first served: a core that is busy with something else takes fewer. */
    int chunk = (int)(N / (threads * 8));
    if (M > 1 && (size_t)chunk * K > 192 * 1024) chunk = (int)(192 * 1024 / K);
    chunk = chunk < 12 ? 12 : (chunk > 192 ? 192 : chunk / 12 * 12);
    call_t call = {x, M, K, N, chunk, 16, ldx, xq, xs, (int32_t *)(xs + M), w, w_scale, bias, w_rowsum, y};
    parallel_chunks(quantize_chunk, &call, (M + 15) / 16, threads);
    parallel_chunks(compute_chunk, &call, (N + chunk - 1) / chunk, threads);
    free(xq);
    free(xs);
}

/* For tests: the activation quantization alone (q as u8 = q + 128, one scale per row). */
void int8_quantize_rows(const float *x, int M, int K, uint8_t *q, float *scales, int32_t *zeros) {
    for (int m = 0; m < M; m++) scales[m] = quantize_row(x + (size_t)m * K, K, q + (size_t)m * K, zeros + m);
}
