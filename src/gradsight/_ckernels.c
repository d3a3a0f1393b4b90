/*
 * gradsight._ckernels: fused one-pass kernels for float32 data on the CPU.
 *
 * rows_f32 and units_f32 summarise tensors (a watch's logged steps), summaries_f32 a whole batch of them with
 * their unit counts in one call; sumsq_f32, copy_sumsq_f32 and
 * diff_sumsq_f32 give the per-step gradient, weight and update norms (the last two fused with the copy or the
 * difference they need).
 *
 * rows_f32 reads each element once for everything a summary row needs: the counts of the 512 (sign, exponent
 * field) codes, the zeros, positive zeros and signed infinities that split the codes' edge bins, and the
 * float64 sum, sum of squares, min and max over the finite elements; it folds those into the rows of
 * gradsight._packing. The numpy reference (gradsight.summary.summarize) defines the numbers.
 *
 * Built at install time when a C compiler is there (setup.py, optional); without it gradsight uses its
 * numpy/torch kernels, which compute the same counts and bins and the same sums up to float64 rounding.
 *
 * The GIL is released while a kernel runs. Plain C99, no numpy headers: arrays arrive through the buffer
 * protocol.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* AVX2 versions of the float passes, chosen at import where the CPU has AVX2 (GCC and Clang on x86-64: the
 * functions are compiled for AVX2 whatever the build's flags, and never called on a CPU without it). */
#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define GS_AVX2 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))
#else
#define GS_AVX2 0
#endif

#define CODES 512   /* bits >> 23: sign (bit 8) and exponent field (bits 0-7) */
#define SPECIALS 4  /* zeros (either sign), positive zeros, +inf, -inf */
#define FLOATS 4    /* sum, sum of squares, min, max (finite elements, float64) */
#define BLOCK 4096  /* elements per block: counted, then summed while in cache */
#define BIG 4096    /* segments at least this long count into four sub-histograms (independent increments) */

/* A segment's running float64 sums (eight lanes, added up at the end), extremes and special counts. */
typedef struct {
    double s[8], q[8];
    float lo, hi;
    int64_t zeros, pzeros, pinf, ninf;
} Acc;

static inline float as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Any elements: non-finite ones are left out of the sums and extremes; zeros and infinities are counted. */
static void block_scalar(const uint32_t *b, Py_ssize_t m, Acc *acc) {
    for (Py_ssize_t i = 0; i < m; i++) {
        uint32_t u = b[i], a = u << 1;
        acc->zeros += a == 0;
        acc->pzeros += u == 0;
        acc->pinf += u == 0x7F800000u;
        acc->ninf += u == 0xFF800000u;
        if ((a >> 24) == 0xFF) continue; /* Inf or NaN */
        float x = as_float(u);
        double v = (double)x;
        acc->s[0] += v;
        acc->q[0] += v * v;
        if (x < acc->lo) acc->lo = x;
        if (x > acc->hi) acc->hi = x;
    }
}

#if defined(__SSE2__)
static void fold(Acc *acc, __m128d s0, __m128d s1, __m128d s2, __m128d s3, __m128d q0, __m128d q1, __m128d q2,
                 __m128d q3, __m128 lo, __m128 hi) {
    double t[8];
    _mm_storeu_pd(t, s0);
    _mm_storeu_pd(t + 2, s1);
    _mm_storeu_pd(t + 4, s2);
    _mm_storeu_pd(t + 6, s3);
    for (int k = 0; k < 8; k++) acc->s[k] += t[k];
    _mm_storeu_pd(t, q0);
    _mm_storeu_pd(t + 2, q1);
    _mm_storeu_pd(t + 4, q2);
    _mm_storeu_pd(t + 6, q3);
    for (int k = 0; k < 8; k++) acc->q[k] += t[k];
    float l[4], h[4];
    _mm_storeu_ps(l, lo);
    _mm_storeu_ps(h, hi);
    for (int k = 0; k < 4; k++) {
        if (l[k] < acc->lo) acc->lo = l[k];
        if (h[k] > acc->hi) acc->hi = h[k];
    }
}

/* Add the four floats of v, widened to float64, to s0 (the first two) and s1 (the last two), their squares to q0
 * and q1. */
static inline void widen_add(__m128 v, __m128d *s0, __m128d *s1, __m128d *q0, __m128d *q1) {
    __m128d lo = _mm_cvtps_pd(v), hi = _mm_cvtps_pd(_mm_movehl_ps(v, v));
    *s0 = _mm_add_pd(*s0, lo);
    *s1 = _mm_add_pd(*s1, hi);
    *q0 = _mm_add_pd(*q0, _mm_mul_pd(lo, lo));
    *q1 = _mm_add_pd(*q1, _mm_mul_pd(hi, hi));
}

/* The four int32 lanes of v, added up. */
static inline int64_t lanes(__m128i v) {
    int32_t t[4];
    _mm_storeu_si128((__m128i *)t, v);
    return (int64_t)t[0] + t[1] + t[2] + t[3];
}

/* Finite elements (no Inf or NaN: the block's histogram said so): no masks. With count_zeros (the histogram shows
 * zeros or subnormals: ReLU outputs, sparse gradients) the zeros and positive zeros are counted on the way;
 * without, there are none. */
static inline void block_floats(const uint32_t *b, Py_ssize_t m, Acc *acc, int count_zeros) {
    const __m128i zero = _mm_setzero_si128();
    __m128d s0 = _mm_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
    __m128 lo = _mm_set1_ps(INFINITY), hi = _mm_set1_ps(-INFINITY);
    __m128i z = zero, pz = zero; /* int32 lanes: a block is far below 2**31 */
    Py_ssize_t i = 0;
    for (; i + 8 <= m; i += 8) {
        __m128i u0 = _mm_loadu_si128((const __m128i *)(b + i)), u1 = _mm_loadu_si128((const __m128i *)(b + i + 4));
        __m128 x0 = _mm_castsi128_ps(u0), x1 = _mm_castsi128_ps(u1);
        lo = _mm_min_ps(lo, _mm_min_ps(x0, x1));
        hi = _mm_max_ps(hi, _mm_max_ps(x0, x1));
        widen_add(x0, &s0, &s1, &q0, &q1);
        widen_add(x1, &s2, &s3, &q2, &q3);
        if (count_zeros) {
            z = _mm_sub_epi32(z, _mm_cmpeq_epi32(_mm_slli_epi32(u0, 1), zero));
            z = _mm_sub_epi32(z, _mm_cmpeq_epi32(_mm_slli_epi32(u1, 1), zero));
            pz = _mm_sub_epi32(pz, _mm_cmpeq_epi32(u0, zero));
            pz = _mm_sub_epi32(pz, _mm_cmpeq_epi32(u1, zero));
        }
    }
    fold(acc, s0, s1, s2, s3, q0, q1, q2, q3, lo, hi);
    if (count_zeros) {
        acc->zeros += lanes(z);
        acc->pzeros += lanes(pz);
    }
    block_scalar(b + i, m - i, acc);
}

static void block_clean(const uint32_t *b, Py_ssize_t m, Acc *acc) { block_floats(b, m, acc, 0); }
static void block_finite(const uint32_t *b, Py_ssize_t m, Acc *acc) { block_floats(b, m, acc, 1); }

/* Any elements, four at a time: non-finite ones masked out of the sums and extremes. */
static void block_masked(const uint32_t *b, Py_ssize_t m, Acc *acc) {
    const __m128i em = _mm_set1_epi32((int)0xFF000000u), zero = _mm_setzero_si128();
    const __m128i pinf = _mm_set1_epi32(0x7F800000), ninf = _mm_set1_epi32((int)0xFF800000u);
    const __m128 inf_ps = _mm_castsi128_ps(pinf), ninf_ps = _mm_castsi128_ps(ninf);
    __m128d s0 = _mm_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
    __m128 lo = _mm_set1_ps(INFINITY), hi = _mm_set1_ps(-INFINITY);
    __m128i z = zero, pz = zero, pi = zero, ni = zero; /* int32 lanes: a block is far below 2**31 */
    Py_ssize_t i = 0;
    for (; i + 4 <= m; i += 4) {
        __m128i u = _mm_loadu_si128((const __m128i *)(b + i));
        __m128i a = _mm_slli_epi32(u, 1);
        __m128i nf = _mm_cmpeq_epi32(_mm_and_si128(a, em), em); /* all ones where Inf or NaN */
        __m128 x = _mm_castsi128_ps(_mm_andnot_si128(nf, u)); /* those read as +0 */
        __m128 nfp = _mm_castsi128_ps(nf);
        lo = _mm_min_ps(lo, _mm_or_ps(x, _mm_and_ps(nfp, inf_ps)));   /* and as +Inf for the min */
        hi = _mm_max_ps(hi, _mm_or_ps(x, _mm_and_ps(nfp, ninf_ps))); /* and as -Inf for the max */
        widen_add(x, &s0, &s1, &q0, &q1);
        z = _mm_sub_epi32(z, _mm_cmpeq_epi32(a, zero));
        pz = _mm_sub_epi32(pz, _mm_cmpeq_epi32(u, zero));
        pi = _mm_sub_epi32(pi, _mm_cmpeq_epi32(u, pinf));
        ni = _mm_sub_epi32(ni, _mm_cmpeq_epi32(u, ninf));
    }
    __m128d nought = _mm_setzero_pd();
    fold(acc, s0, s1, nought, nought, q0, q1, nought, nought, lo, hi);
    acc->zeros += lanes(z);
    acc->pzeros += lanes(pz);
    acc->pinf += lanes(pi);
    acc->ninf += lanes(ni);
    block_scalar(b + i, m - i, acc);
}
#else
#define block_clean block_scalar
#define block_finite block_scalar
#define block_masked block_scalar
#endif

#if GS_AVX2
/* Add four float64 lanes of a and b to acc's accumulators d[0..3] and d[4..7]. */
AVX2_FN static inline void fold4(double *d, __m256d a, __m256d b) {
    double t[8];
    _mm256_storeu_pd(t, a);
    _mm256_storeu_pd(t + 4, b);
    for (int k = 0; k < 8; k++) d[k] += t[k];
}

AVX2_FN static inline void fold_minmax(Acc *acc, __m256 lo, __m256 hi) {
    float l[8], h[8];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(h, hi);
    for (int k = 0; k < 8; k++) {
        if (l[k] < acc->lo) acc->lo = l[k];
        if (h[k] > acc->hi) acc->hi = h[k];
    }
}

/* The eight floats of x widened to float64: their sum into s0, s1 and their squares into q0, q1. */
AVX2_FN static inline void widen_add8(__m256 x, __m256d *s0, __m256d *s1, __m256d *q0, __m256d *q1) {
    __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    *s0 = _mm256_add_pd(*s0, a);
    *s1 = _mm256_add_pd(*s1, b);
    *q0 = _mm256_add_pd(*q0, _mm256_mul_pd(a, a));
    *q1 = _mm256_add_pd(*q1, _mm256_mul_pd(b, b));
}

/* block_clean and block_finite with AVX2, sixteen floats a round. */
AVX2_FN static void block_floats_avx2(const uint32_t *b, Py_ssize_t m, Acc *acc, int count_zeros) {
    const __m256i zero = _mm256_setzero_si256();
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
    __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY);
    __m256i z = zero, pz = zero; /* int32 lanes: a block is far below 2**31 */
    Py_ssize_t i = 0;
    for (; i + 16 <= m; i += 16) {
        __m256i u0 = _mm256_loadu_si256((const __m256i *)(b + i)), u1 = _mm256_loadu_si256((const __m256i *)(b + i + 8));
        __m256 x0 = _mm256_castsi256_ps(u0), x1 = _mm256_castsi256_ps(u1);
        lo = _mm256_min_ps(lo, _mm256_min_ps(x0, x1));
        hi = _mm256_max_ps(hi, _mm256_max_ps(x0, x1));
        widen_add8(x0, &s0, &s1, &q0, &q1);
        widen_add8(x1, &s2, &s3, &q2, &q3);
        if (count_zeros) {
            z = _mm256_sub_epi32(z, _mm256_cmpeq_epi32(_mm256_slli_epi32(u0, 1), zero));
            z = _mm256_sub_epi32(z, _mm256_cmpeq_epi32(_mm256_slli_epi32(u1, 1), zero));
            pz = _mm256_sub_epi32(pz, _mm256_cmpeq_epi32(u0, zero));
            pz = _mm256_sub_epi32(pz, _mm256_cmpeq_epi32(u1, zero));
        }
    }
    fold4(acc->s, _mm256_add_pd(s0, s2), _mm256_add_pd(s1, s3));
    fold4(acc->q, _mm256_add_pd(q0, q2), _mm256_add_pd(q1, q3));
    fold_minmax(acc, lo, hi);
    if (count_zeros) {
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, z);
        for (int k = 0; k < 8; k++) acc->zeros += t[k];
        _mm256_storeu_si256((__m256i *)t, pz);
        for (int k = 0; k < 8; k++) acc->pzeros += t[k];
    }
    block_scalar(b + i, m - i, acc);
}

AVX2_FN static void block_clean_avx2(const uint32_t *b, Py_ssize_t m, Acc *acc) { block_floats_avx2(b, m, acc, 0); }
AVX2_FN static void block_finite_avx2(const uint32_t *b, Py_ssize_t m, Acc *acc) { block_floats_avx2(b, m, acc, 1); }
#endif

/* The float passes in use (set at import, see simd()). */
typedef void (*block_fn)(const uint32_t *, Py_ssize_t, Acc *);
static block_fn clean_pass = block_clean, finite_pass = block_finite;

/* Counts of the codes 255 and 511 (exponent field 255, either sign: Inf, NaN) in a histogram. */
static inline int64_t nonfinite_codes(const int64_t *h) { return h[255] + h[511]; }
/* Counts of the codes 0 and 256 (exponent field 0, either sign: zeros, subnormals) in a histogram. */
static inline int64_t low_codes(const int64_t *h) { return h[0] + h[256]; }

typedef struct {
    Acc acc;
    int64_t *h, *h1, *h2, *h3;
    int split;
    int64_t seen_nf, seen_low; /* Inf/NaN codes and zero/subnormal codes counted so far */
} Seg;

/* Start a segment of n elements in all: codes into h (CODES counts, added to); scratch: 3 * CODES int64. */
static void seg_begin(Seg *g, int64_t *h, int64_t *scratch, Py_ssize_t n) {
    memset(&g->acc, 0, sizeof g->acc);
    g->acc.lo = INFINITY;
    g->acc.hi = -INFINITY;
    g->h = h;
    g->h1 = scratch;
    g->h2 = scratch + CODES;
    g->h3 = scratch + 2 * CODES;
    g->split = n >= BIG;
    if (g->split) memset(scratch, 0, 3 * CODES * sizeof(int64_t));
    g->seen_nf = g->seen_low = 0;
}

/* Feed the next n elements of the segment. */
static void seg_feed(Seg *g, const uint32_t *b, Py_ssize_t n) {
    int64_t *h = g->h, *h1 = g->h1, *h2 = g->h2, *h3 = g->h3;
    int split = g->split;
    for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {
        const uint32_t *p = b + lo;
        Py_ssize_t m = n - lo < BLOCK ? n - lo : BLOCK, i = 0;
        if (split) {
            for (; i + 4 <= m; i += 4) {
                h[p[i] >> 23]++;
                h1[p[i + 1] >> 23]++;
                h2[p[i + 2] >> 23]++;
                h3[p[i + 3] >> 23]++;
            }
        }
        for (; i < m; i++) h[p[i] >> 23]++;
        int64_t nf = nonfinite_codes(h) + (split ? nonfinite_codes(h1) + nonfinite_codes(h2) + nonfinite_codes(h3) : 0);
        int64_t low = low_codes(h) + (split ? low_codes(h1) + low_codes(h2) + low_codes(h3) : 0);
        if (nf != g->seen_nf)
            block_masked(p, m, &g->acc);
        else if (low != g->seen_low)
            finite_pass(p, m, &g->acc);
        else
            clean_pass(p, m, &g->acc); /* no zero here: the zero count stays exact */
        g->seen_nf = nf;
        g->seen_low = low;
    }
}

/* End the segment: the sub-histograms into h, specials into sp, floats into fl. */
static void seg_end(Seg *g, int64_t *sp, double *fl) {
    const Acc *acc = &g->acc;
    if (g->split)
        for (int k = 0; k < CODES; k++) g->h[k] += g->h1[k] + g->h2[k] + g->h3[k];
    sp[0] = acc->zeros;
    sp[1] = acc->pzeros;
    sp[2] = acc->pinf;
    sp[3] = acc->ninf;
    fl[0] = ((acc->s[0] + acc->s[1]) + (acc->s[2] + acc->s[3])) + ((acc->s[4] + acc->s[5]) + (acc->s[6] + acc->s[7]));
    fl[1] = ((acc->q[0] + acc->q[1]) + (acc->q[2] + acc->q[3])) + ((acc->q[4] + acc->q[5]) + (acc->q[6] + acc->q[7]));
    fl[2] = (double)acc->lo;
    fl[3] = (double)acc->hi;
}

/* One segment: codes into h (CODES counts, added to), specials into sp, floats into fl (both written).
 * Block by block: the codes first (four sub-histograms for long segments, so that increments of the same bin do
 * not wait on each other), then the floats while the block is in cache: without masks when the block's codes
 * show no Inf or NaN, and without counting zeros either when they show only normal numbers. */
static void segment(const uint32_t *b, Py_ssize_t n, int64_t *h, int64_t *sp, double *fl, int64_t *scratch) {
    Seg g;
    seg_begin(&g, h, scratch, n);
    seg_feed(&g, b, n);
    seg_end(&g, sp, fl);
}

static int check(Py_buffer *buf, const char *name, Py_ssize_t itemsize, Py_ssize_t items) {
    if (buf->len != itemsize * items) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes; expected %zd (%zd items of %zd bytes)", name,
                     buf->len, itemsize * items, items, itemsize);
        return 0;
    }
    return 1;
}

/* The row layout of gradsight._packing (checked against it when gradsight._kernels imports this module). */
#define R_COUNT 0
#define R_ZEROS 1
#define R_NAN 2
#define R_POSINF 3
#define R_NEGINF 4
#define R_POSITIVE 5
#define R_FLOATS 6 /* sum, sum of squares, min, max: float64, bit-cast */
#define R_HIST 10
#define R_BINS 256
#define ROW (R_HIST + R_BINS)

/* One segment's summary row from its codes h (CODES counts), specials sp and floats fl: every count exact. */
static void fold_row(const int64_t *h, const int64_t *sp, const double *fl, Py_ssize_t count, int64_t *row) {
    int64_t positive = 0;
    for (int k = 0; k < 255; k++) positive += h[k]; /* sign 0, exponent field below 255: +0, subnormal, normal */
    row[R_COUNT] = count;
    row[R_ZEROS] = sp[0];
    row[R_NAN] = h[255] + h[511] - sp[2] - sp[3]; /* exponent field 255, either sign, less the infinities */
    row[R_POSINF] = sp[2];
    row[R_NEGINF] = sp[3];
    row[R_POSITIVE] = positive - sp[1];
    memcpy(row + R_FLOATS, fl, FLOATS * sizeof(double));
    for (int k = 0; k < R_BINS; k++) row[R_HIST + k] = h[k] + h[256 + k]; /* the exponent field, either sign */
    row[R_HIST] -= sp[0];                                                  /* bin 0: the subnormals */
    row[R_HIST + 255] = 0;                                                 /* Inf and NaN have no bin */
}

static int float32_buffer(PyObject *obj, Py_buffer *view, const char *fn, Py_ssize_t k) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s takes C-contiguous float32 arrays; buffer %zd (%s) is not C-contiguous "
                     "or has no buffer", fn, k, Py_TYPE(obj)->tp_name);
        return 0;
    }
    const char *f = view->format ? view->format : "B";
    if (view->itemsize != 4 || !(strcmp(f, "f") == 0 || strcmp(f, "=f") == 0 || strcmp(f, "<f") == 0)) {
        const char *name = strcmp(f, "d") == 0 ? "float64" : strcmp(f, "e") == 0 ? "float16" : f;
        PyErr_Format(PyExc_ValueError, "%s takes C-contiguous float32 arrays; buffer %zd is %s", fn, k, name);
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(rows_f32_doc,
             "rows_f32(datas, offsets, rows)\n\n"
             "Summary rows of the segments datas[b][offsets[b][k]:offsets[b][k+1]] of float32 buffers, buffer after\n"
             "buffer (n segments in all), each element read once.\n\n"
             "datas: C-contiguous float32 arrays, read flat. offsets: per buffer, None (the buffer is one segment)\n"
             "or an int64 array non-decreasing from 0 to the buffer's length. rows: int64 (n, ROW), written in the\n"
             "layout of gradsight._packing: the counts, the float64 sum, sum of squares, min and max over the finite\n"
             "elements (bit-cast; min +inf and max -inf when none) and the 256 exponent bins.");

static PyObject *rows_f32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *datas, *offs, *fd = NULL, *fo = NULL, *result = NULL;
    Py_buffer rows = {0};
    Py_buffer *bd = NULL, *bo = NULL;
    Py_ssize_t m = 0, got = 0, goto_ = 0, n = 0;
    int64_t *scratch = NULL;
    if (!PyArg_ParseTuple(args, "OOw*", &datas, &offs, &rows)) return NULL;
    if ((fd = PySequence_Fast(datas, "rows_f32: expected a list of float32 arrays")) == NULL ||
        (fo = PySequence_Fast(offs, "rows_f32: expected a list of offsets (None or int64 arrays)")) == NULL)
        goto done;
    m = PySequence_Fast_GET_SIZE(fd);
    if (PySequence_Fast_GET_SIZE(fo) != m) {
        PyErr_Format(PyExc_ValueError, "rows_f32: %zd buffers but %zd offset arrays", m, PySequence_Fast_GET_SIZE(fo));
        goto done;
    }
    bd = PyMem_Calloc((size_t)m + 1, sizeof(Py_buffer));
    bo = PyMem_Calloc((size_t)m + 1, sizeof(Py_buffer));
    scratch = PyMem_RawMalloc(4 * CODES * sizeof(int64_t));
    if (bd == NULL || bo == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < m; got++)
        if (!float32_buffer(PySequence_Fast_GET_ITEM(fd, got), &bd[got], "rows_f32", got)) goto done;
    for (; goto_ < m; goto_++) {
        Py_ssize_t k = goto_;
        PyObject *o = PySequence_Fast_GET_ITEM(fo, k);
        if (o == Py_None) { /* bo[k].buf stays NULL: one segment */
            n += 1;
            continue;
        }
        if (PyObject_GetBuffer(o, &bo[k], PyBUF_SIMPLE) < 0) goto done;
        Py_ssize_t segs = bo[k].len / (Py_ssize_t)sizeof(int64_t) - 1;
        const int64_t *off = (const int64_t *)bo[k].buf;
        int ok = segs >= 0 && bo[k].len % (Py_ssize_t)sizeof(int64_t) == 0;
        ok = ok && off[0] == 0 && off[segs] == bd[k].len / 4;
        for (Py_ssize_t j = 0; ok && j < segs; j++) ok = off[j] <= off[j + 1];
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "rows_f32: buffer %zd: its offsets must be int64, start at 0, not "
                         "decrease, and end at its length in float32 (%zd)", k, bd[k].len / 4);
            goto_++;
            goto done;
        }
        n += segs;
    }
    if (rows.len != n * ROW * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "rows_f32: rows has %zd bytes; expected %zd (%zd rows of %d int64)", rows.len,
                     n * ROW * (Py_ssize_t)sizeof(int64_t), n, ROW);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    int64_t *out = (int64_t *)rows.buf, *h = scratch + 3 * CODES;
    int64_t sp[SPECIALS];
    double fl[FLOATS];
    for (Py_ssize_t k = 0; k < m; k++) {
        const uint32_t *bits = (const uint32_t *)bd[k].buf;
        const int64_t *off = (const int64_t *)bo[k].buf;
        Py_ssize_t total = bd[k].len / 4, segs = off == NULL ? 1 : bo[k].len / (Py_ssize_t)sizeof(int64_t) - 1;
        for (Py_ssize_t j = 0; j < segs; j++, out += ROW) {
            Py_ssize_t a = off == NULL ? 0 : (Py_ssize_t)off[j], b = off == NULL ? total : (Py_ssize_t)off[j + 1];
            memset(h, 0, CODES * sizeof(int64_t));
            segment(bits + a, b - a, h, sp, fl, scratch);
            fold_row(h, sp, fl, b - a, out);
        }
    }
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&bd[k]);
    for (Py_ssize_t k = 0; k < goto_; k++)
        if (bo[k].obj != NULL) PyBuffer_Release(&bo[k]);
    PyMem_Free(bd);
    PyMem_Free(bo);
    PyMem_RawFree(scratch);
    PyBuffer_Release(&rows);
    Py_XDECREF(fd);
    Py_XDECREF(fo);
    return result;
}

/* Add to o[u] the non-zero elements (NaN counts, -0.0 does not) of unit u of b seen as (pre, units, post).
 * tmp: units uint32 counts, zeroed, used when post == 1 (per-unit counts over up to 2**31 rows: vectorised adds);
 * left zeroed. */
static void count_units(const uint32_t *b, Py_ssize_t pre, Py_ssize_t units, Py_ssize_t post, int64_t *o,
                        uint32_t *tmp) {
    for (Py_ssize_t r = 0; r < pre; r++) {
        const uint32_t *row = b + r * units * post;
        if (post == 1) {
            for (Py_ssize_t u = 0; u < units; u++) tmp[u] += (row[u] << 1) != 0;
            if ((r & 0x7FFFFFFF) == 0x7FFFFFFF || r == pre - 1) {
                for (Py_ssize_t u = 0; u < units; u++) o[u] += tmp[u];
                memset(tmp, 0, (size_t)units * sizeof(uint32_t));
            }
            continue;
        }
        for (Py_ssize_t u = 0; u < units; u++) {
            const uint32_t *p = row + u * post;
            int64_t total = 0;
            for (Py_ssize_t lo = 0; lo < post; lo += (Py_ssize_t)1 << 30) { /* uint32 counts: vectorised */
                Py_ssize_t hi = post - lo < ((Py_ssize_t)1 << 30) ? post : lo + ((Py_ssize_t)1 << 30);
                uint32_t c = 0;
                for (Py_ssize_t k = lo; k < hi; k++) c += (p[k] << 1) != 0;
                total += c;
            }
            o[u] += total;
        }
    }
}

/* The summary row of b seen as (pre, units, post) and its unit counts added to c, in one pass: each (pre, unit)
 * plane of post elements is read once for both. h: CODES int64 (zeroed here); scratch: 3 * CODES int64. */
static void rows_units(const uint32_t *b, Py_ssize_t pre, Py_ssize_t units, Py_ssize_t post, int64_t *h,
                       int64_t *scratch, int64_t *row, int64_t *c) {
    int64_t sp[SPECIALS];
    double fl[FLOATS];
    Py_ssize_t total = pre * units * post;
    Seg g;
    memset(h, 0, CODES * sizeof(int64_t));
    seg_begin(&g, h, scratch, total);
    for (Py_ssize_t r = 0; r < pre; r++)
        for (Py_ssize_t u = 0; u < units; u++) {
            int64_t zeros = g.acc.zeros;
            seg_feed(&g, b + (r * units + u) * post, post);
            c[u] += post - (g.acc.zeros - zeros);
        }
    seg_end(&g, sp, fl);
    fold_row(h, sp, fl, total, row);
}

PyDoc_STRVAR(rows_units_f32_doc,
             "rows_units_f32(data, pre, units, post, row, counts)\n\n"
             "The summary row of a float32 buffer seen as (pre, units, post), C order, and per unit the number of\n"
             "its non-zero elements added to counts (int64, units entries; NaN counts, -0.0 does not), in one\n"
             "pass: each (pre, unit) plane of post elements is read once for both. row: int64 (ROW,), written.");

static PyObject *rows_units_f32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj, *result = NULL;
    Py_buffer data = {0}, row = {0}, counts = {0};
    Py_ssize_t pre, units, post;
    int64_t *scratch = NULL;
    if (!PyArg_ParseTuple(args, "Onnnw*w*", &obj, &pre, &units, &post, &row, &counts)) return NULL;
    if (!float32_buffer(obj, &data, "rows_units_f32", 0)) goto done;
    if (pre < 0 || units < 0 || post < 0 || !check(&data, "data", 4, pre * units * post) ||
        !check(&row, "row", sizeof(int64_t), ROW) || !check(&counts, "counts", sizeof(int64_t), units))
        goto done;
    scratch = PyMem_RawMalloc(4 * CODES * sizeof(int64_t));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    rows_units((const uint32_t *)data.buf, pre, units, post, scratch + 3 * CODES, scratch, (int64_t *)row.buf,
               (int64_t *)counts.buf);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(scratch);
    if (data.obj != NULL) PyBuffer_Release(&data);
    PyBuffer_Release(&row);
    PyBuffer_Release(&counts);
    return result;
}

PyDoc_STRVAR(units_f32_doc,
             "units_f32(data, pre, units, post, out)\n\n"
             "Add to out[u] (int64, units entries) the number of non-zero elements of unit u of a float32 buffer\n"
             "seen as (pre, units, post), C order. NaN counts as non-zero, -0.0 as zero (like x != 0).");

static PyObject *units_f32(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, out;
    Py_ssize_t pre, units, post;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &data, &pre, &units, &post, &out)) return NULL;
    PyObject *result = NULL;
    uint32_t *tmp = NULL; /* post == 1: per-unit uint32 counts over up to 2**31 rows (vectorised adds) */
    if (pre < 0 || units < 0 || post < 0 || (units && post && pre > PY_SSIZE_T_MAX / units / post) ||
        !check(&data, "data", 4, pre * units * post) || !check(&out, "out", sizeof(int64_t), units))
        goto done;
    if (post == 1 && units && (tmp = PyMem_RawCalloc((size_t)units, sizeof(uint32_t))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    count_units((const uint32_t *)data.buf, pre, units, post, (int64_t *)out.buf, tmp);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(tmp);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(summaries_f32_doc,
             "summaries_f32(datas, axes, rows, counts)\n\n"
             "The summary rows of whole float32 arrays and the unit counts of those that have a unit axis, in one\n"
             "call (a watch's batch of tensors, each read where it is).\n\n"
             "datas: C-contiguous float32 arrays of any shape. axes: per array, None (no unit counts) or its unit\n"
             "axis in [0, ndim). rows: int64 (n, ROW), written as rows_f32 writes them. counts: int64, the arrays'\n"
             "unit counts one after the other (as many entries as their unit axes' lengths add up to), written:\n"
             "per unit the number of its non-zero elements (NaN counts, -0.0 does not). An array whose units'\n"
             "elements lie together in runs of 32 or more (a convolution's channels) is read once for both.");

#define FUSE_RUN 32 /* runs of a unit's elements at least this long: the row and the counts in one pass */

static PyObject *summaries_f32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *datas, *axes, *fd = NULL, *fa = NULL, *result = NULL;
    Py_buffer rows = {0}, counts = {0};
    Py_buffer *bd = NULL;
    Py_ssize_t *spec = NULL; /* per array: pre, units, post (units -1: no unit axis) */
    Py_ssize_t m = 0, got = 0, total_units = 0, max_units = 0;
    int64_t *scratch = NULL;
    uint32_t *tmp = NULL;
    if (!PyArg_ParseTuple(args, "OOw*w*", &datas, &axes, &rows, &counts)) return NULL;
    if ((fd = PySequence_Fast(datas, "summaries_f32: expected a list of float32 arrays")) == NULL ||
        (fa = PySequence_Fast(axes, "summaries_f32: expected a list of unit axes (None or int)")) == NULL)
        goto done;
    m = PySequence_Fast_GET_SIZE(fd);
    if (PySequence_Fast_GET_SIZE(fa) != m) {
        PyErr_Format(PyExc_ValueError, "summaries_f32: %zd arrays but %zd unit axes", m, PySequence_Fast_GET_SIZE(fa));
        goto done;
    }
    bd = PyMem_Calloc((size_t)m + 1, sizeof(Py_buffer));
    spec = PyMem_Calloc(3 * (size_t)m + 1, sizeof(Py_ssize_t));
    scratch = PyMem_RawMalloc(4 * CODES * sizeof(int64_t));
    if (bd == NULL || spec == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < m; got++)
        if (!float32_buffer(PySequence_Fast_GET_ITEM(fd, got), &bd[got], "summaries_f32", got)) goto done;
    for (Py_ssize_t k = 0; k < m; k++) {
        PyObject *a = PySequence_Fast_GET_ITEM(fa, k);
        Py_ssize_t *sk = spec + 3 * k, ndim = bd[k].ndim;
        sk[1] = -1;
        if (a == Py_None) continue;
        Py_ssize_t axis = PyLong_AsSsize_t(a);
        if (axis == -1 && PyErr_Occurred()) goto done;
        if (axis < 0 || axis >= ndim) {
            PyErr_Format(PyExc_ValueError, "summaries_f32: array %zd has %zd dimensions; its unit axis %zd is not "
                         "in [0, %zd)", k, ndim, axis, ndim);
            goto done;
        }
        sk[0] = sk[2] = 1;
        for (Py_ssize_t d = 0; d < axis; d++) sk[0] *= bd[k].shape[d];
        sk[1] = bd[k].shape[axis];
        for (Py_ssize_t d = axis + 1; d < ndim; d++) sk[2] *= bd[k].shape[d];
        total_units += sk[1];
        if (sk[2] == 1 && sk[1] > max_units) max_units = sk[1];
    }
    if (rows.len != m * ROW * (Py_ssize_t)sizeof(int64_t) || counts.len != total_units * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "summaries_f32: rows has %zd bytes and counts %zd; expected %zd (%zd rows of "
                     "%d int64) and %zd (%zd units)", rows.len, counts.len, m * ROW * (Py_ssize_t)sizeof(int64_t), m,
                     ROW, total_units * (Py_ssize_t)sizeof(int64_t), total_units);
        goto done;
    }
    if (max_units && (tmp = PyMem_RawCalloc((size_t)max_units, sizeof(uint32_t))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    int64_t *out = (int64_t *)rows.buf, *c = (int64_t *)counts.buf, *h = scratch + 3 * CODES;
    int64_t sp[SPECIALS];
    double fl[FLOATS];
    memset(c, 0, (size_t)total_units * sizeof(int64_t));
    for (Py_ssize_t k = 0; k < m; k++, out += ROW) {
        const uint32_t *bits = (const uint32_t *)bd[k].buf;
        const Py_ssize_t *sk = spec + 3 * k;
        if (sk[1] >= 0 && sk[2] >= FUSE_RUN) {
            rows_units(bits, sk[0], sk[1], sk[2], h, scratch, out, c);
        } else {
            memset(h, 0, CODES * sizeof(int64_t));
            segment(bits, bd[k].len / 4, h, sp, fl, scratch);
            fold_row(h, sp, fl, bd[k].len / 4, out);
            if (sk[1] > 0) count_units(bits, sk[0], sk[1], sk[2], c, tmp);
        }
        if (sk[1] > 0) c += sk[1];
    }
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&bd[k]);
    PyMem_Free(bd);
    PyMem_Free(spec);
    PyMem_RawFree(scratch);
    PyMem_RawFree(tmp);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&counts);
    Py_XDECREF(fd);
    Py_XDECREF(fa);
    return result;
}

/* ---- per-step norms: sums of squares of float32 tensors, in float64, fused with a copy or a difference ---- */

/* Sum of squares in float64 of x (op 0: y is not read), of x while copying it to y (op 1), or of the float32
 * difference x - y (op 2: rounded as the float32 subtraction rounds it, then squared and summed in float64; op 3:
 * the same, also written to z). z is read only by op 3. */
static double sumsq(const float *x, float *y, float *z, Py_ssize_t n, int op) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    Py_ssize_t i = 0;
#if defined(__SSE2__)
    /* sixteen floats per round into eight accumulators: enough independent adds to keep up with memory */
    __m128d a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm_setzero_pd();
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 4; j++) {
            __m128 v = _mm_loadu_ps(x + i + 4 * j);
            if (op == 1)
                _mm_storeu_ps(y + i + 4 * j, v);
            else if (op >= 2)
                v = _mm_sub_ps(v, _mm_loadu_ps(y + i + 4 * j));
            if (op == 3) _mm_storeu_ps(z + i + 4 * j, v);
            __m128d lo = _mm_cvtps_pd(v), hi = _mm_cvtps_pd(_mm_movehl_ps(v, v));
            a[2 * j] = _mm_add_pd(a[2 * j], _mm_mul_pd(lo, lo));
            a[2 * j + 1] = _mm_add_pd(a[2 * j + 1], _mm_mul_pd(hi, hi));
        }
    }
    double t[16];
    for (int k = 0; k < 8; k++) _mm_storeu_pd(t + 2 * k, a[k]);
    s0 = (t[0] + t[1]) + (t[2] + t[3]);
    s1 = (t[4] + t[5]) + (t[6] + t[7]);
    s2 = (t[8] + t[9]) + (t[10] + t[11]);
    s3 = (t[12] + t[13]) + (t[14] + t[15]);
#endif
    for (; i < n; i++) {
        float v = x[i];
        if (op == 1)
            y[i] = v;
        else if (op >= 2)
            v = v - y[i];
        if (op == 3) z[i] = v;
        double d = (double)v;
        s0 += d * d;
    }
    return (s0 + s1) + (s2 + s3);
}

#if GS_AVX2
/* sumsq with AVX2: sixteen floats a round into four accumulators of four float64 lanes. */
AVX2_FN static double sumsq_avx2(const float *x, float *y, float *z, Py_ssize_t n, int op) {
    __m256d a[4];
    for (int k = 0; k < 4; k++) a[k] = _mm256_setzero_pd();
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 2; j++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * j);
            if (op == 1)
                _mm256_storeu_ps(y + i + 8 * j, v);
            else if (op >= 2)
                v = _mm256_sub_ps(v, _mm256_loadu_ps(y + i + 8 * j));
            if (op == 3) _mm256_storeu_ps(z + i + 8 * j, v);
            __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            a[2 * j] = _mm256_add_pd(a[2 * j], _mm256_mul_pd(lo, lo));
            a[2 * j + 1] = _mm256_add_pd(a[2 * j + 1], _mm256_mul_pd(hi, hi));
        }
    }
    double t[16], s0 = 0;
    for (int k = 0; k < 4; k++) _mm256_storeu_pd(t + 4 * k, a[k]);
    for (; i < n; i++) {
        float v = x[i];
        if (op == 1)
            y[i] = v;
        else if (op >= 2)
            v = v - y[i];
        if (op == 3) z[i] = v;
        double d = (double)v;
        s0 += d * d;
    }
    return (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))) +
           (((t[8] + t[9]) + (t[10] + t[11])) + ((t[12] + t[13]) + (t[14] + t[15]))) + s0;
}
#endif

typedef double (*sumsq_fn)(const float *, float *, float *, Py_ssize_t, int);
static sumsq_fn sumsq_pass = sumsq;

/* Acquire the k-th buffer of a sequence: float32, C-contiguous, writable if asked, of len bytes if len >= 0. */
static int get_f32(PyObject *seq, Py_ssize_t k, Py_buffer *view, int writable, Py_ssize_t len, const char *name,
                   const char *which) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), view, flags) < 0) return 0;
    if (view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0 || (len >= 0 && view->len != len)) {
        PyErr_Format(PyExc_ValueError, "%s: array %zd of %s is not a float32 array%s", name, k, which,
                     len >= 0 ? " of the size of the first list's" : "");
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* A new list of the n doubles v[k] as Python floats (NULL with an exception set if that fails). */
static PyObject *float_list(const double *v, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *f = PyFloat_FromDouble(v[k]);
        if (f == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, f);
    }
    return list;
}

/* The op over lists of arrays (xs, ys; zs for op 3), float32 and C-contiguous; a list of float64 sums of squares. */
static PyObject *sumsq_lists(PyObject *args, int op, const char *name) {
    PyObject *xs, *ys, *zs = NULL, *fx = NULL, *fy = NULL, *fz = NULL, *result = NULL;
    Py_buffer *bx = NULL, *by = NULL, *bz = NULL;
    double *out = NULL;
    Py_ssize_t n = 0, got = 0, goty = 0, gotz = 0;
    if (!PyArg_ParseTuple(args, op == 3 ? "OOO" : "OO", &xs, &ys, &zs)) return NULL;
    if ((fx = PySequence_Fast(xs, "expected a list of float32 arrays")) == NULL ||
        (fy = PySequence_Fast(ys, "expected a list of float32 arrays")) == NULL ||
        (op == 3 && (fz = PySequence_Fast(zs, "expected a list of float32 arrays")) == NULL))
        goto done;
    n = PySequence_Fast_GET_SIZE(fx);
    if (PySequence_Fast_GET_SIZE(fy) != n || (fz != NULL && PySequence_Fast_GET_SIZE(fz) != n)) {
        if (fz != NULL)
            PyErr_Format(PyExc_ValueError, "%s: lists of %zd, %zd and %zd arrays; expected as many", name, n,
                         PySequence_Fast_GET_SIZE(fy), PySequence_Fast_GET_SIZE(fz));
        else
            PyErr_Format(PyExc_ValueError, "%s: lists of %zd and %zd arrays; expected as many", name, n,
                         PySequence_Fast_GET_SIZE(fy));
        goto done;
    }
    bx = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    by = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    bz = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    out = PyMem_Calloc((size_t)n + 1, sizeof(double));
    if (bx == NULL || by == NULL || bz == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++)
        if (!get_f32(fx, got, &bx[got], 0, -1, name, "the first list")) goto done;
    for (; goty < n; goty++)
        if (!get_f32(fy, goty, &by[goty], op == 1, bx[goty].len, name, "the second list")) goto done;
    for (; fz != NULL && gotz < n; gotz++)
        if (!get_f32(fz, gotz, &bz[gotz], 1, bx[gotz].len, name, "the third list")) goto done;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t k = 0; k < n; k++)
        out[k] = sumsq_pass((const float *)bx[k].buf, (float *)by[k].buf, (float *)bz[k].buf, bx[k].len / 4, op);
    Py_END_ALLOW_THREADS;
    result = float_list(out, n);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&bx[k]);
    for (Py_ssize_t k = 0; k < goty; k++) PyBuffer_Release(&by[k]);
    for (Py_ssize_t k = 0; k < gotz; k++) PyBuffer_Release(&bz[k]);
    PyMem_Free(bx);
    PyMem_Free(by);
    PyMem_Free(bz);
    PyMem_Free(out);
    Py_XDECREF(fx);
    Py_XDECREF(fy);
    Py_XDECREF(fz);
    return result;
}

PyDoc_STRVAR(copy_sumsq_f32_doc,
             "copy_sumsq_f32(xs, ys) -> list: copy each float32 array xs[k] into ys[k] and return the sums of\n"
             "squares (float64) of what was copied.");
static PyObject *copy_sumsq_f32(PyObject *self, PyObject *args) {
    (void)self;
    return sumsq_lists(args, 1, "copy_sumsq_f32");
}

PyDoc_STRVAR(sumsq_f32_doc,
             "sumsq_f32(xs) -> list: the sum of squares (float64) of each float32 array xs[k].");
static PyObject *sumsq_f32(PyObject *self, PyObject *args) {
    PyObject *xs, *pair, *result;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &xs)) return NULL;
    if ((pair = PyTuple_Pack(2, xs, xs)) == NULL) return NULL; /* op 0 reads only the first list */
    result = sumsq_lists(pair, 0, "sumsq_f32");
    Py_DECREF(pair);
    return result;
}

PyDoc_STRVAR(sumsq_at_f32_doc,
             "sumsq_at_f32(addresses, counts) -> list: the sum of squares (float64) of the counts[k] float32 values\n"
             "at addresses[k]. For callers that hold the memory (a framework tensor's data pointer) and checked it is\n"
             "contiguous float32 host memory of that many values: nothing here can check it.");
static PyObject *sumsq_at_f32(PyObject *self, PyObject *args) {
    PyObject *addrs, *counts, *fa = NULL, *fc = NULL, *result = NULL;
    const float **at = NULL;
    Py_ssize_t *len = NULL;
    double *out = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &addrs, &counts)) return NULL;
    if ((fa = PySequence_Fast(addrs, "expected a list of addresses")) == NULL ||
        (fc = PySequence_Fast(counts, "expected a list of counts")) == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fa);
    if (PySequence_Fast_GET_SIZE(fc) != n) {
        PyErr_Format(PyExc_ValueError, "sumsq_at_f32: %zd addresses and %zd counts; expected as many", n,
                     PySequence_Fast_GET_SIZE(fc));
        goto done;
    }
    at = PyMem_Calloc((size_t)n + 1, sizeof(float *));
    len = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    out = PyMem_Calloc((size_t)n + 1, sizeof(double));
    if (at == NULL || len == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        at[k] = (const float *)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(fa, k));
        len[k] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fc, k));
        if (PyErr_Occurred()) goto done;
        if (len[k] < 0 || (at[k] == NULL && len[k] > 0)) {
            PyErr_Format(PyExc_ValueError, "sumsq_at_f32: entry %zd has a null address or a negative count", k);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t k = 0; k < n; k++) out[k] = sumsq_pass(at[k], NULL, NULL, len[k], 0);
    Py_END_ALLOW_THREADS;
    result = float_list(out, n);
done:
    PyMem_Free(at);
    PyMem_Free(len);
    PyMem_Free(out);
    Py_XDECREF(fa);
    Py_XDECREF(fc);
    return result;
}

PyDoc_STRVAR(diff_sumsq_f32_doc,
             "diff_sumsq_f32(xs, ys) -> list: per pair, the float64 sum of squares of the float32 difference\n"
             "xs[k] - ys[k] (each difference rounded to float32, as a float32 subtraction gives it).");
static PyObject *diff_sumsq_f32(PyObject *self, PyObject *args) {
    (void)self;
    return sumsq_lists(args, 2, "diff_sumsq_f32");
}

PyDoc_STRVAR(diff_into_sumsq_f32_doc,
             "diff_into_sumsq_f32(xs, ys, zs) -> list: write each float32 difference xs[k] - ys[k] into zs[k] (rounded\n"
             "as a float32 subtraction rounds it) and return the float64 sums of squares of what was written.");
static PyObject *diff_into_sumsq_f32(PyObject *self, PyObject *args) {
    (void)self;
    return sumsq_lists(args, 3, "diff_into_sumsq_f32");
}

static int has_avx2(void) {
#if GS_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

static const char *simd_level(void) {
#if GS_AVX2
    if (clean_pass == block_clean_avx2) return "avx2";
#endif
#if defined(__SSE2__)
    return "sse2";
#else
    return "scalar";
#endif
}

static int set_simd(const char *level) {
    if (strcmp(level, "avx2") == 0) {
#if GS_AVX2
        if (!has_avx2()) return 0;
        clean_pass = block_clean_avx2;
        finite_pass = block_finite_avx2;
        sumsq_pass = sumsq_avx2;
        return 1;
#else
        return 0;
#endif
    }
    if (strcmp(level, simd_level()) == 0 || strcmp(level, "default") == 0 ||
        (strcmp(level, "sse2") == 0 && strcmp(simd_level(), "avx2") == 0)) {
        clean_pass = block_clean;
        finite_pass = block_finite;
        sumsq_pass = sumsq;
        return 1;
    }
    return 0;
}

PyDoc_STRVAR(simd_doc,
             "simd(level=None) -> str: the instruction set the float passes use (\"avx2\", \"sse2\" or \"scalar\").\n\n"
             "With a level, switch to it first (for tests: \"avx2\" only where the CPU has it, or the build's own\n"
             "level); ValueError for a level this build or CPU cannot use.");

static PyObject *simd(PyObject *self, PyObject *args) {
    (void)self;
    const char *level = NULL;
    if (!PyArg_ParseTuple(args, "|z", &level)) return NULL;
    if (level != NULL && !set_simd(level)) {
        PyErr_Format(PyExc_ValueError, "simd: %s is not available here (this build and CPU use %s%s)", level,
                     simd_level(), has_avx2() && strcmp(simd_level(), "avx2") != 0 ? " or avx2" : "");
        return NULL;
    }
    return PyUnicode_FromString(simd_level());
}

static PyMethodDef methods[] = {
    {"simd", simd, METH_VARARGS, simd_doc},
    {"sumsq_f32", sumsq_f32, METH_VARARGS, sumsq_f32_doc},
    {"sumsq_at_f32", sumsq_at_f32, METH_VARARGS, sumsq_at_f32_doc},
    {"copy_sumsq_f32", copy_sumsq_f32, METH_VARARGS, copy_sumsq_f32_doc},
    {"diff_sumsq_f32", diff_sumsq_f32, METH_VARARGS, diff_sumsq_f32_doc},
    {"diff_into_sumsq_f32", diff_into_sumsq_f32, METH_VARARGS, diff_into_sumsq_f32_doc},
    {"units_f32", units_f32, METH_VARARGS, units_f32_doc},
    {"rows_f32", rows_f32, METH_VARARGS, rows_f32_doc},
    {"rows_units_f32", rows_units_f32, METH_VARARGS, rows_units_f32_doc},
    {"summaries_f32", summaries_f32, METH_VARARGS, summaries_f32_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernels", "gradsight's compiled summary kernel (see gradsight._kernels).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernels(void) {
    if (has_avx2()) set_simd("avx2");
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && (PyModule_AddIntConstant(mod, "ROW", ROW) < 0 || PyModule_AddIntConstant(mod, "HIST", R_HIST) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
