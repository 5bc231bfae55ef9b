/* Fused float32 ops of a Qwen2 layer for AVX2 CPUs: RMSNorm (with the residual add), rotate-half
 * RoPE in place, causal grouped-query attention against a KV cache, SiLU(gate) * up.
 *
 * Each replaces several torch calls (RMSNorm is 5, RoPE 4 per tensor, the attention a mask plus
 * SDPA on torch's single thread): a decoded token makes ~24 layers x these, where per-call
 * overhead, not arithmetic, was the cost. Work that is large enough (prefills) is split over the
 * shared pool (pool.h); a single token's norm/RoPE/SiLU runs on the caller.
 *
 * Attention: for every KV head g, the query heads of its group (GQA) are stacked as rows, so a
 * block of keys is loaded once for all of them. Rows are (query position i, head h); row r of a
 * block of QB positions is i = i0 + r / G, h = g * G + r % G. Keys are visited in blocks of BK:
 * the block is transposed (Kt[d][j]) so S = Q Kt is a register-tiled product (4 rows x 16 keys),
 * then an online softmax (running max m, sum l, output O rescaled when m grows) and O += P V
 * (4 rows x 16 dims). Query i sees keys [0, past + i]: blocks past every row's limit are skipped,
 * keys past a row's own limit get p = 0. One chunk of pool work = one (KV head, query block).
 *
 * Plain C, built with the other *.c files here (see __init__.py): gcc -O3 -mavx2 -mfma -mf16c.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

#define INLINE static inline __attribute__((always_inline))

int ops_abi_version(void) { return 2; }

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x, 8 lanes (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial; about
 * 1 ulp). Inputs below -87.3 give ~1e-38 (callers zero what must be exactly 0). */
INLINE __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Rows [0, M) in chunks of ROWS for the pool; fewer than 2 chunks or tiny work stays on the caller. */
#define ROWS 16
static int threads_for(long work, int threads) { return work < 32768 ? 1 : threads; }

/* ---- RMSNorm: x += residual (optional, in place), y = w * (x / sqrt(mean(x^2) + eps)) ---------- */

typedef struct {
    float *x;
    const float *res, *w;
    float *y;
    int M, H;
    float eps;
} norm_t;

static void norm_rows(void *p, int c) {
    const norm_t *a = (const norm_t *)p;
    const int m1 = (c + 1) * ROWS < a->M ? (c + 1) * ROWS : a->M;
    const int H = a->H, H8 = H & ~7;
    for (int m = c * ROWS; m < m1; m++) {
        float *x = a->x + (size_t)m * H;
        float *y = a->y + (size_t)m * H;
        __m256 ss = _mm256_setzero_ps();
        int k = 0;
        if (a->res) {
            const float *r = a->res + (size_t)m * H;
            for (; k < H8; k += 8) {
                const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(r + k));
                _mm256_storeu_ps(x + k, v);
                ss = _mm256_fmadd_ps(v, v, ss);
            }
            for (int j = k; j < H; j++) x[j] += r[j];
        } else {
            for (; k < H8; k += 8) {
                const __m256 v = _mm256_loadu_ps(x + k);
                ss = _mm256_fmadd_ps(v, v, ss);
            }
        }
        float s = hsum_ps(ss);
        for (; k < H; k++) s += x[k] * x[k];
        const float inv = 1.0f / sqrtf(s / (float)H + a->eps);
        const __m256 vi = _mm256_set1_ps(inv);
        for (k = 0; k < H8; k += 8)
            _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vi), _mm256_loadu_ps(a->w + k)));
        for (; k < H; k++) y[k] = (x[k] * inv) * a->w[k];
    }
}

/* x, residual, y: (M, H) contiguous; residual may be NULL; y may equal x only without residual. */
void ops_rmsnorm(float *x, const float *residual, const float *w, float *y, int M, int H, float eps, int threads) {
    norm_t a = {x, residual, w, y, M, H, eps};
    parallel_chunks(norm_rows, &a, (M + ROWS - 1) / ROWS, threads_for((long)M * H, threads));
}

/* ---- RoPE in place: rotate-half, x' = x * cos + [-x2, x1] * sin, for `heads` head vectors of D
 * floats at the start of every row (q heads then k heads in a fused qkv row) ------------------- */

typedef struct {
    float *x;
    long ldx;
    int M, heads, D;
    const float *cos, *sin;
} rope_t;

static void rope_rows(void *p, int c) {
    const rope_t *a = (const rope_t *)p;
    const int m1 = (c + 1) * ROWS < a->M ? (c + 1) * ROWS : a->M;
    const int D = a->D, half = D / 2;
    for (int m = c * ROWS; m < m1; m++) {
        const float *cs = a->cos + (size_t)m * D, *sn = a->sin + (size_t)m * D;
        for (int h = 0; h < a->heads; h++) {
            float *x = a->x + (size_t)m * a->ldx + (size_t)h * D;
            int j = 0;
            for (; j + 8 <= half; j += 8) {
                const __m256 x1 = _mm256_loadu_ps(x + j), x2 = _mm256_loadu_ps(x + half + j);
                const __m256 c1 = _mm256_loadu_ps(cs + j), c2 = _mm256_loadu_ps(cs + half + j);
                const __m256 s1 = _mm256_loadu_ps(sn + j), s2 = _mm256_loadu_ps(sn + half + j);
                _mm256_storeu_ps(x + j, _mm256_fnmadd_ps(x2, s1, _mm256_mul_ps(x1, c1)));
                _mm256_storeu_ps(x + half + j, _mm256_fmadd_ps(x1, s2, _mm256_mul_ps(x2, c2)));
            }
            for (; j < half; j++) {
                const float x1 = x[j], x2 = x[half + j];
                x[j] = x1 * cs[j] - x2 * sn[j];
                x[half + j] = x2 * cs[half + j] + x1 * sn[half + j];
            }
        }
    }
}

/* x: M rows of stride ldx floats; cos/sin: (M, D) contiguous. */
void ops_rope(float *x, int M, long ldx, int heads, int D, const float *cos, const float *sin, int threads) {
    rope_t a = {x, ldx, M, heads, D, cos, sin};
    parallel_chunks(rope_rows, &a, (M + ROWS - 1) / ROWS, threads_for((long)M * heads * D, threads));
}

/* ---- SiLU(gate) * up: gu (M, 2I) = [gate | up] rows, out (M, I) -------------------------------- */

typedef struct {
    const float *gu;
    float *out;
    int M, I;
} silu_t;

static void silu_rows(void *p, int c) {
    const silu_t *a = (const silu_t *)p;
    const int m1 = (c + 1) * ROWS < a->M ? (c + 1) * ROWS : a->M;
    const int I = a->I;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int m = c * ROWS; m < m1; m++) {
        const float *g = a->gu + (size_t)m * 2 * I, *u = g + I;
        float *o = a->out + (size_t)m * I;
        int k = 0;
        for (; k + 8 <= I; k += 8) {
            const __m256 x = _mm256_loadu_ps(g + k);
            const __m256 e = exp_ps(_mm256_xor_ps(x, sign)); /* e^-x */
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + k)));
        }
        for (; k < I; k++) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    }
}

void ops_silu_mul(const float *gu, int M, int I, float *out, int threads) {
    silu_t a = {gu, out, M, I};
    parallel_chunks(silu_rows, &a, (M + ROWS - 1) / ROWS, threads_for((long)M * I * 4, threads));
}

/* ---- attention ----------------------------------------------------------------------------- */

#define BK 64       /* keys per block */
#define MAX_D 256   /* head_dim limit (the Python side checks) */

typedef struct {
    const float *q, *k, *v;
    long ldq;          /* floats between query positions; head h of position i at q + i*ldq + h*D */
    long ksh, kst;     /* key strides (floats): per KV head, per token */
    long vsh, vst;
    float *out;
    long ldo;
    int n, past, heads, kv_heads, D, qb, nqb;
    float scale;
} attn_t;

/* Kt[d][j] = K[j][d] for j < bk (zeros for bk <= j < BK), d < D (D % 8 == 0): 8 x 8 tiles
 * transposed in registers (a scalar column walk was half of a decode step's attention). */
static void transpose_block(const float *K, long kst, int bk, int D, float *Kt) {
    static const float zeros[MAX_D] __attribute__((aligned(32)));
    for (int j = 0; j < BK; j += 8) {
        const float *row[8];
        for (int t = 0; t < 8; t++) row[t] = j + t < bk ? K + (size_t)(j + t) * kst : zeros;
        for (int d = 0; d < D; d += 8) {
            __m256 r0 = _mm256_loadu_ps(row[0] + d), r1 = _mm256_loadu_ps(row[1] + d);
            __m256 r2 = _mm256_loadu_ps(row[2] + d), r3 = _mm256_loadu_ps(row[3] + d);
            __m256 r4 = _mm256_loadu_ps(row[4] + d), r5 = _mm256_loadu_ps(row[5] + d);
            __m256 r6 = _mm256_loadu_ps(row[6] + d), r7 = _mm256_loadu_ps(row[7] + d);
            const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            r0 = _mm256_shuffle_ps(t0, t2, 0x44);
            r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            r2 = _mm256_shuffle_ps(t1, t3, 0x44);
            r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            r4 = _mm256_shuffle_ps(t4, t6, 0x44);
            r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            r6 = _mm256_shuffle_ps(t5, t7, 0x44);
            r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = Kt + (size_t)d * BK + j;
            _mm256_store_ps(o + 0 * BK, _mm256_permute2f128_ps(r0, r4, 0x20));
            _mm256_store_ps(o + 1 * BK, _mm256_permute2f128_ps(r1, r5, 0x20));
            _mm256_store_ps(o + 2 * BK, _mm256_permute2f128_ps(r2, r6, 0x20));
            _mm256_store_ps(o + 3 * BK, _mm256_permute2f128_ps(r3, r7, 0x20));
            _mm256_store_ps(o + 4 * BK, _mm256_permute2f128_ps(r0, r4, 0x31));
            _mm256_store_ps(o + 5 * BK, _mm256_permute2f128_ps(r1, r5, 0x31));
            _mm256_store_ps(o + 6 * BK, _mm256_permute2f128_ps(r2, r6, 0x31));
            _mm256_store_ps(o + 7 * BK, _mm256_permute2f128_ps(r3, r7, 0x31));
        }
    }
}

/* S[r][0:BK] = Q[r] . Kt[:, 0:BK] for rows [r0, r0 + R) (R <= 4), 16 keys per step. */
INLINE void qk_tile(const float *Q, int D, const float *Kt, float *S, int R) {
    for (int j = 0; j < BK; j += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            const __m256 k0 = _mm256_load_ps(Kt + d * BK + j), k1 = _mm256_load_ps(Kt + d * BK + j + 8);
            for (int r = 0; r < R; r++) {
                const __m256 qv = _mm256_broadcast_ss(Q + r * D + d);
                acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_store_ps(S + r * BK + j, acc[r][0]);
            _mm256_store_ps(S + r * BK + j + 8, acc[r][1]);
        }
    }
}

/* O[r][:] += sum_{j < nk} P[r][j] * V[j][:] for R <= 4 rows, 16 dims per step (8 for a tail). */
INLINE void pv_tile(const float *P, const float *V, long vst, int nk, float *O, int D, int R) {
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_load_ps(O + r * D + d);
            acc[r][1] = _mm256_load_ps(O + r * D + d + 8);
        }
        for (int j = 0; j < nk; j++) {
            const __m256 v0 = _mm256_loadu_ps(V + j * vst + d), v1 = _mm256_loadu_ps(V + j * vst + d + 8);
            for (int r = 0; r < R; r++) {
                const __m256 p = _mm256_broadcast_ss(P + r * BK + j);
                acc[r][0] = _mm256_fmadd_ps(p, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(p, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_store_ps(O + r * D + d, acc[r][0]);
            _mm256_store_ps(O + r * D + d + 8, acc[r][1]);
        }
    }
    if (d < D) { /* D % 16 == 8 */
        __m256 acc[4];
        for (int r = 0; r < R; r++) acc[r] = _mm256_load_ps(O + r * D + d);
        for (int j = 0; j < nk; j++) {
            const __m256 v0 = _mm256_loadu_ps(V + j * vst + d);
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * BK + j), v0, acc[r]);
        }
        for (int r = 0; r < R; r++) _mm256_store_ps(O + r * D + d, acc[r]);
    }
}

#define TILE4(call_)                                                                          \
    switch (R) {                                                                              \
    case 4: { const int R_ = 4; call_; break; }                                               \
    case 3: { const int R_ = 3; call_; break; }                                               \
    case 2: { const int R_ = 2; call_; break; }                                               \
    default: { const int R_ = 1; call_; break; }                                              \
    }

static void attn_chunk(void *p, int c) {
    const attn_t *a = (const attn_t *)p;
    const int G = a->heads / a->kv_heads, D = a->D;
    const int g = c % a->kv_heads, qblock = a->nqb - 1 - c / a->kv_heads; /* latest (longest) first */
    const int i0 = qblock * a->qb, i1 = i0 + a->qb < a->n ? i0 + a->qb : a->n;
    const int rows = (i1 - i0) * G;
    /* Scratch: Q (scaled), O, S/P, Kt, m, l. */
    const size_t rd = (size_t)rows * D;
    float *buf = (float *)aligned_alloc(32, sizeof(float) * (2 * rd + (size_t)rows * BK + (size_t)D * BK + 2 * (size_t)rows + 8));
    if (!buf) {
        for (int i = i0; i < i1; i++)
            for (int h = g * G; h < (g + 1) * G; h++)
                for (int d = 0; d < D; d++) a->out[(size_t)i * a->ldo + (size_t)h * D + d] = NAN;
        return;
    }
    float *Q = buf, *O = Q + rd, *S = O + rd, *Kt = S + (size_t)rows * BK, *mx = Kt + (size_t)D * BK, *l = mx + rows;
    const __m256 vscale = _mm256_set1_ps(a->scale);
    for (int r = 0; r < rows; r++) {
        const float *q = a->q + (size_t)(i0 + r / G) * a->ldq + (size_t)(g * G + r % G) * D;
        for (int d = 0; d < D; d += 8) _mm256_store_ps(Q + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(q + d), vscale));
        mx[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(O, 0, sizeof(float) * rd);
    const float *K = a->k + g * a->ksh, *V = a->v + g * a->vsh;
    const int kend = a->past + i1; /* keys any row of the block may see */
    for (int j0 = 0; j0 < kend; j0 += BK) {
        const int bk = kend - j0 < BK ? kend - j0 : BK;
        transpose_block(K + (size_t)j0 * a->kst, a->kst, bk, D, Kt);
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int R = rows - r0 < 4 ? rows - r0 : 4;
            TILE4(qk_tile(Q + r0 * D, D, Kt, S + r0 * BK, R_));
        }
        int nk_max = 0;
        for (int r = 0; r < rows; r++) {
            const int limit = a->past + i0 + r / G + 1; /* keys [0, limit) visible */
            int cnt = limit - j0 < bk ? limit - j0 : bk;
            float *s = S + r * BK;
            if (cnt <= 0) { /* nothing visible here: p = 0 */
                memset(s, 0, sizeof(float) * BK);
                continue;
            }
            nk_max = cnt > nk_max ? cnt : nk_max;
            for (int j = cnt; j < BK; j++) s[j] = -INFINITY;
            __m256 vm = _mm256_set1_ps(-INFINITY);
            for (int j = 0; j < BK; j += 8) vm = _mm256_max_ps(vm, _mm256_load_ps(s + j));
            const float m_new = fmaxf(mx[r], hmax_ps(vm));
            const float alpha = expf(mx[r] - m_new); /* 0 on the first block (mx = -inf) */
            mx[r] = m_new;
            const __m256 vmn = _mm256_set1_ps(m_new);
            __m256 sum = _mm256_setzero_ps();
            int j = 0;
            for (; j + 8 <= cnt; j += 8) {
                const __m256 e = exp_ps(_mm256_sub_ps(_mm256_load_ps(s + j), vmn));
                _mm256_store_ps(s + j, e);
                sum = _mm256_add_ps(sum, e);
            }
            float tail = 0.0f;
            for (; j < cnt; j++) tail += (s[j] = expf(s[j] - m_new));
            for (; j < BK; j++) s[j] = 0.0f;
            l[r] = l[r] * alpha + hsum_ps(sum) + tail;
            if (alpha != 1.0f) {
                const __m256 va = _mm256_set1_ps(alpha);
                for (int d = 0; d < D; d += 8) _mm256_store_ps(O + r * D + d, _mm256_mul_ps(_mm256_load_ps(O + r * D + d), va));
            }
        }
        const float *Vb = V + (size_t)j0 * a->vst;
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int R = rows - r0 < 4 ? rows - r0 : 4;
            TILE4(pv_tile(S + r0 * BK, Vb, a->vst, nk_max, O + r0 * D, D, R_));
        }
    }
    for (int r = 0; r < rows; r++) {
        float *o = a->out + (size_t)(i0 + r / G) * a->ldo + (size_t)(g * G + r % G) * D;
        const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_load_ps(O + r * D + d), inv));
    }
    free(buf);
}

/* out[i][h*D:(h+1)*D] = softmax(scale * q_i,h . K_g[0 : past+i+1]) V_g[0 : past+i+1], g = h / G:
 * n new query positions, the cache holding past + n keys per KV head (the new ones last).
 * D % 8 == 0, heads % kv_heads == 0. Strides are in floats; the last dimension is contiguous. */
void ops_attention(const float *q, long ldq, int n, int heads, int kv_heads, int D, const float *k, long ksh,
                   long kst, const float *v, long vsh, long vst, int past, float *out, long ldo, float scale,
                   int threads) {
    if (n <= 0) return;
    const int G = heads / kv_heads;
    int qb = (64 + G - 1) / G; /* ~64 rows a block */
    if (qb > n) qb = n;
    attn_t a = {q, k, v, ldq, ksh, kst, vsh, vst, out, ldo, n, past, heads, kv_heads, D, qb, (n + qb - 1) / qb, scale};
    const int chunks = a.nqb * kv_heads;
    parallel_chunks(attn_chunk, &a, chunks, threads_for((long)n * (past + n) * heads * D, threads));
}

/* ---- whole layer halves on int8 weights (int8_gemm.c), for one call per half from Python ---- */

/* An int8 linear layer as native.PreparedWeight holds it. */
typedef struct {
    const int8_t *w;
    const float *scale;
    const int32_t *rowsum;
    const float *bias; /* or NULL */
    int N, K;
} lin_t;

void int8_linear(const float *x, int M, int K, const int8_t *w, const float *w_scale, const int32_t *w_rowsum,
                 const float *bias, float *y, int N, int threads);

static void lin(const lin_t *l, const float *x, int M, float *y, int threads) {
    int8_linear(x, M, l->K, l->w, l->scale, l->rowsum, l->bias, y, l->N, threads);
}

/* Into a layer: x += res (when res), h = RMSNorm(x), qkv = h @ Wqkv.T (+ b), then RoPE in place on
 * the first rope_heads heads of every qkv row (q and k; 0: none, the caller rotates later).
 * x, res: (M, H); qkv: (M, qkv->N); cos, sin: (M, D). Returns 0, or -1 when out of memory. */
int ops_layer_in(float *x, const float *res, const float *norm_w, float eps, int M, int H, const lin_t *qkv_l,
                 float *qkv, const float *cos, const float *sin, int rope_heads, int D, int threads) {
    float *h = (float *)malloc(sizeof(float) * (size_t)M * H);
    if (!h) return -1;
    ops_rmsnorm(x, res, norm_w, h, M, H, eps, threads);
    lin(qkv_l, h, M, qkv, threads);
    if (rope_heads) ops_rope(qkv, M, qkv_l->N, rope_heads, D, cos, sin, threads);
    free(h);
    return 0;
}

/* The rest of a layer for M query rows: a = attention (as ops_attention) @ Wo.T; x += a;
 * h = RMSNorm(x); d = (SiLU(gate) * up)(h @ Wgu.T) @ Wdown.T into d (M, H), which the caller adds
 * to x with the next norm (ops_layer_in's res, or ops_rmsnorm's residual for the final norm). */
int ops_layer_out(const float *q, long ldq, int M, int heads, int kv_heads, int D, const float *k, long ksh, long kst,
                  const float *v, long vsh, long vst, int past, float scale, float *x, int H, const lin_t *o_l,
                  const float *norm_w, float eps, const lin_t *gu_l, const lin_t *down_l, float *d, int threads) {
    const int I = gu_l->N / 2;
    float *att = (float *)malloc(sizeof(float) * (size_t)M * heads * D);
    float *h = (float *)malloc(sizeof(float) * (size_t)M * H);
    float *gu = (float *)malloc(sizeof(float) * (size_t)M * gu_l->N);
    float *m = (float *)malloc(sizeof(float) * (size_t)M * I);
    int status = -1;
    if (att && h && gu && m) {
        ops_attention(q, ldq, M, heads, kv_heads, D, k, ksh, kst, v, vsh, vst, past, att, (long)heads * D, scale,
                      threads);
        lin(o_l, att, M, d, threads); /* d holds a for a moment */
        ops_rmsnorm(x, d, norm_w, h, M, H, eps, threads);
        lin(gu_l, h, M, gu, threads);
        ops_silu_mul(gu, M, I, m, threads);
        lin(down_l, m, M, d, threads);
        status = 0;
    }
    free(att);
    free(h);
    free(gu);
    free(m);
    return status;
}
