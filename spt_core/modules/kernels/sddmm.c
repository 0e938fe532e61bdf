/* The K entry gradients of a sparse delta: out[e] += sum over tokens t0 <= t < t1 of g[t, row(e)] * x[t, col[e]],
   the entries given in CSR over d_out x n (row-major sorted), g and x row-major in fp32, bf16 or fp16.
   A tile of TB tokens of every row of g and every column of x is laid out token-contiguous in fp32 scratch
   (16 x 16 register transposes with AVX-512), then each entry is one TB-long dot product from that tile.
   Built and called by spt_core/modules/native.py; plain C with a portable fallback for other CPUs. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TB 64 /* tokens per tile */

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) u = sign;
    else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f; memcpy(&f, &u, 4); return f;
}

static inline float load1(const void *a, int64_t i, int dtype) {
    if (dtype == F32) return ((const float *)a)[i];
    uint16_t v = ((const uint16_t *)a)[i];
    if (dtype == F16) return half_to_float(v);
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f;
}

#if defined(__AVX512F__)
static inline __m512 load16(const void *a, int64_t i, int dtype) {
    if (dtype == F32) return _mm512_loadu_ps((const float *)a + i);
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)a + i));
    if (dtype == F16) return _mm512_cvtph_ps(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}
#endif

/* out[c * TB + t] = a[t0 + t, c] in fp32 for t < nt, zero for nt <= t < TB. */
static void lay_out(const void *a, int64_t lda, int dtype, int64_t t0, int64_t nt, int64_t w, float *out) {
    int64_t c = 0;
#if defined(__AVX512F__)
    int64_t w16 = w / 16 * 16;
    for (int64_t tb = 0; tb < TB; tb += 16) /* 16 token rows at a time: their lines stay in L1 across c */
        for (c = 0; c < w16; c += 16) {
            __m512 r[16];
            for (int k = 0; k < 16; k++)
                r[k] = tb + k < nt ? load16(a, (t0 + tb + k) * lda + c, dtype) : _mm512_setzero_ps();
            transpose16(r);
            for (int k = 0; k < 16; k++) _mm512_storeu_ps(out + (c + k) * TB + tb, r[k]);
        }
#endif
    for (; c < w; c++)
        for (int64_t t = 0; t < TB; t++) out[c * TB + t] = t < nt ? load1(a, (t0 + t) * lda + c, dtype) : 0.f;
}

static inline float dot_tile(const float *restrict a, const float *restrict b) {
#if defined(__AVX512F__)
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int t = 16; t < TB; t += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + t), _mm512_loadu_ps(b + t), s);
    return _mm512_reduce_add_ps(s);
#else
    float acc[16] = {0}, s = 0.f;
    for (int t = 0; t < TB; t += 16)
        for (int k = 0; k < 16; k++) acc[k] += a[t + k] * b[t + k];
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
#endif
}

typedef struct {
    const void *g, *x;
    int64_t ldg, ldx, t0, t1, d_out, n, k;
    int dtype;
    const int64_t *crow, *col;
    float *out, *scratch;
} job_t;

/* One token range: out[e] = its sum for every entry e; scratch holds (d_out + n) * TB floats. */
static void *run_job(void *arg) {
    const job_t *j = arg;
    float *gt = j->scratch, *xt = gt + j->d_out * TB;
    memset(j->out, 0, sizeof(float) * j->k);
    for (int64_t s = j->t0; s < j->t1; s += TB) {
        int64_t nt = j->t1 - s < TB ? j->t1 - s : TB;
        lay_out(j->g, j->ldg, j->dtype, s, nt, j->d_out, gt);
        lay_out(j->x, j->ldx, j->dtype, s, nt, j->n, xt);
        for (int64_t i = 0; i < j->d_out; i++)
            for (int64_t e = j->crow[i]; e < j->crow[i + 1]; e++)
                j->out[e] += dot_tile(gt + i * TB, xt + j->col[e] * TB);
    }
    return NULL;
}

/* g: tokens x d_out (row stride ldg), x: tokens x n (row stride ldx), both of `dtype`; the K entries in CSR
   over d_out x n (crow, col). The tokens are split in `threads` tile-aligned ranges, range p writing its sums
   to out[p * K ...] (the caller adds the rows) with scratch[p * spt_sddmm_scratch(d_out, n) ...]; returns
   the number of ranges (threads, or fewer where there are fewer tiles). */
int spt_sddmm(const void *g, int64_t ldg, const void *x, int64_t ldx, int dtype, int64_t tokens, int64_t d_out,
               int64_t n, const int64_t *crow, const int64_t *col, int threads, float *out, float *scratch) {
    int64_t k = crow[d_out], per = (tokens + TB - 1) / TB;
    if (threads < 1) threads = 1;
    if (threads > per) threads = per > 0 ? (int)per : 1;
    job_t jobs[64];
    pthread_t ids[64];
    if (threads > 64) threads = 64;
    for (int p = 0; p < threads; p++) {
        int64_t lo = per * p / threads * TB, hi = per * (p + 1) / threads * TB;
        jobs[p] = (job_t){g, x, ldg, ldx, lo, hi < tokens ? hi : tokens, d_out, n, k, dtype, crow, col,
                          out + p * k, scratch + p * (d_out + n) * TB};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, run_job, &jobs[started])) break;
    for (int p = started; p < threads; p++) run_job(&jobs[p]); /* could not start a thread: run it here */
    run_job(&jobs[0]);
    for (int p = 1; p < started; p++) pthread_join(ids[p], NULL);
    return threads;
}

int64_t spt_sddmm_scratch(int64_t d_out, int64_t n) { return (d_out + n) * TB; }

int spt_sddmm_simd(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
