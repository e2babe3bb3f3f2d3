/* Top-k candidates and argmax of logits rows, for generation.py: the parts of a step that read the
 * whole [rows, vocabulary] matrix. In numpy the top-k search is ~25 small calls, and split over
 * Python pool tasks each took the GIL back, beside the server's busy HTTP thread waiting up to the
 * switch interval (H100, 64 rows: 3-4.6 ms a sampled step's search). Here it is one ctypes call a
 * step (native.py keeps the GIL through it), with the rows split over threads started in C.
 *
 * Per row (row_candidates): one vectorised pass takes the maxima of blocks of 64 logits; the k-th
 * largest of those bounds the row's k-th largest logit from below, so only the few blocks that reach
 * it are read again, and of their tokens those at or above the row's k-th largest logit are kept, in
 * token order, ties included: exactly the set that holds the row's top k whatever order ties are
 * broken in. A row with a NaN, or a flat one (more tokens near the top than `cap`), gets a count of
 * -1 and is drawn from whole by the caller.
 *
 * It is also an (empty) Python module only so that setuptools builds it like any extension. */

#ifndef GGUFRUN_TOPK_NO_PYTHON /* (bench/gpu/setup.sh builds it so where there are no Python headers) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 64

/* The largest of the BLOCK floats at b (a NaN may be skipped), with whether any is NaN or-ed into
 * *nan: a vector kept in a register across the row. SSE2, which every x86-64 has: GCC does not
 * vectorise this loop by itself (it was 2.5x slower as plain C). */
static inline float block_max(const float *b, int *nan) {
#if defined(__SSE2__)
    /* A tree, not a running maximum: a chain of dependent max_ps is latency-bound (2x slower). */
    __m128 m[8], u[8];
    for (int q = 0; q < 8; q++) {
        const __m128 x = _mm_loadu_ps(b + 8 * q), y = _mm_loadu_ps(b + 8 * q + 4);
        m[q] = _mm_max_ps(x, y);
        u[q] = _mm_cmpunord_ps(x, y);
    }
    for (int w = 4; w >= 1; w /= 2)
        for (int q = 0; q < w; q++) {
            m[q] = _mm_max_ps(m[q], m[q + w]);
            u[q] = _mm_or_ps(u[q], u[q + w]);
        }
    __m128 r = _mm_max_ps(m[0], _mm_shuffle_ps(m[0], m[0], _MM_SHUFFLE(1, 0, 3, 2)));
    r = _mm_max_ps(r, _mm_shuffle_ps(r, r, _MM_SHUFFLE(2, 3, 0, 1)));
    *nan |= _mm_movemask_ps(u[0]);
    return _mm_cvtss_f32(r);
#else
    float m = b[0];
    for (int q = 0; q < BLOCK; q++) {
        *nan |= b[q] != b[q];
        m = b[q] > m ? b[q] : m;
    }
    return m;
#endif
}

static void sift_down(float *h, int64_t n, int64_t i) {
    float x = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] < h[c]) c++;
        if (!(h[c] < x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static inline void offer(float *heap, int64_t k, float x) {
    if (x > heap[0]) {
        heap[0] = x;
        sift_down(heap, k, 0);
    }
}

/* The k-th largest of the n values at x (k <= n), with heap: scratch of k floats. */
static float kth_largest(const float *x, int64_t n, int64_t k, float *heap) {
    for (int64_t i = 0; i < k; i++) heap[i] = x[i];
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
    for (int64_t i = k; i < n; i++) offer(heap, k, x[i]);
    return heap[0];
}

/* One row: its count of candidates written to ids/vals (at most cap), or -1. scratch: k + v / BLOCK
 * floats. The k-th largest block maximum t0 is at most the row's k-th largest logit t (k blocks
 * reach it), so every token >= t lies in a block whose maximum reaches t0: the one pass over the
 * row is the block maxima's, and only those few blocks are read again. */
static int64_t row_candidates(const float *row, int64_t v, int64_t k, int64_t cap, float *scratch, int32_t *ids, float *vals) {
    const int64_t nb = v / BLOCK;
    if (k <= 0 || k > nb) return -1; /* a vocabulary this small: the caller draws from the whole row */
    float *heap = scratch, *bmax = scratch + k;
    int nan = 0;
    for (int64_t b = 0; b < nb; b++) bmax[b] = block_max(row + b * BLOCK, &nan);
    for (int64_t j = nb * BLOCK; j < v; j++) nan |= row[j] != row[j];
    if (nan) return -1; /* no order to trust */
    const float t0 = kth_largest(bmax, nb, k, heap);
    int64_t n = 0;
    for (int64_t b = 0; b <= nb; b++) {
        if (b < nb && bmax[b] < t0) continue;
        const int64_t end = b < nb ? (b + 1) * BLOCK : v; /* the tail past the last block: always read */
        for (int64_t j = b * BLOCK; j < end; j++) {
            if (row[j] >= t0) {
                if (n == cap) return -1; /* a flat row: thousands tie near the top */
                ids[n] = (int32_t)j;
                vals[n] = row[j];
                n++;
            }
        }
    }
    if (n < k) return -1;
    const float t = kth_largest(vals, n, k, heap);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (vals[i] >= t) {
            ids[m] = ids[i];
            vals[m] = vals[i];
            m++;
        }
    }
    return m;
}

/* The first index of the row's largest value, numpy's argmax: the first NaN if there is one. */
static int64_t row_argmax(const float *row, int64_t v) {
    const int64_t nb = v / BLOCK;
    int nan = 0;
    float best = -INFINITY;
    int64_t best_block = -1;
    for (int64_t b = 0; b < nb; b++) {
        const float m = block_max(row + b * BLOCK, &nan);
        if (nan) break;
        if (m > best) {
            best = m;
            best_block = b;
        }
    }
    int64_t j = 0, end = v;
    if (!nan && best_block >= 0) { /* the first maximum is in the first block that reaches it, or the tail */
        j = best_block * BLOCK;
        end = j + BLOCK;
    }
    int64_t at = j;
    best = row[j];
    for (; j < end; j++) {
        if (row[j] != row[j]) return j;
        if (row[j] > best) {
            best = row[j];
            at = j;
        }
    }
    for (j = nb * BLOCK > end ? nb * BLOCK : end; j < v; j++) { /* the tail past the last block */
        if (row[j] != row[j]) return j;
        if (row[j] > best) {
            best = row[j];
            at = j;
        }
    }
    return at;
}

/* A call's work, split by rows over threads: a [64, 152k] matrix fresh from the GPU is 39 MB,
 * more than one core reads quickly. Threads are started per call (~20 us each) so that nothing
 * lingers between steps; without pthreads (Windows), one thread does it all. */
typedef struct {
    const float *logits;
    int64_t v, stride, cap, r0, r1;
    const int64_t *ks;
    int32_t *ids;
    float *vals;
    int64_t *out;
} job_t;

static void *topk_job(void *arg) {
    job_t *j = (job_t *)arg;
    int64_t k = 0;
    for (int64_t r = j->r0; r < j->r1; r++) k = j->ks[r] > k ? j->ks[r] : k;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(k + j->v / BLOCK + 1));
    for (int64_t r = j->r0; r < j->r1; r++)
        j->out[r] = scratch ? row_candidates(j->logits + r * j->stride, j->v, j->ks[r], j->cap, scratch,
                                             j->ids + r * j->cap, j->vals + r * j->cap) : -1;
    free(scratch);
    return NULL;
}

static void *argmax_job(void *arg) {
    job_t *j = (job_t *)arg;
    for (int64_t r = j->r0; r < j->r1; r++) j->out[r] = row_argmax(j->logits + r * j->stride, j->v);
    return NULL;
}

#if !defined(_WIN32)
#include <pthread.h>
#define MAX_THREADS 64
#endif

static void run_jobs(void *(*fn)(void *), job_t base, int64_t rows, int64_t threads) {
    job_t jobs[64];
#if !defined(_WIN32)
    pthread_t tids[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
#else
    threads = 1;
#endif
    if (threads > rows) threads = rows;
    if (threads < 1) threads = 1;
    int started[64] = {0};
    for (int64_t t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].r0 = rows * t / threads;
        jobs[t].r1 = rows * (t + 1) / threads;
#if !defined(_WIN32)
        if (t > 0) started[t] = pthread_create(&tids[t], NULL, fn, &jobs[t]) == 0;
#endif
    }
    fn(&jobs[0]);
    for (int64_t t = 1; t < threads; t++) {
#if !defined(_WIN32)
        if (started[t]) {
            pthread_join(tids[t], NULL);
            continue;
        }
#endif
        fn(&jobs[t]); /* a thread that could not start: its rows here */
    }
}

/* rows x v logits (row stride `stride` floats); ks[r]: the row's k; out: ids and vals [rows, cap],
 * counts [rows] (-1: draw from the whole row). */
void ggufrun_topk_candidates(const float *logits, int64_t rows, int64_t v, int64_t stride, const int64_t *ks,
                             int64_t cap, int32_t *ids, float *vals, int64_t *counts, int64_t threads) {
    job_t base = {logits, v, stride, cap, 0, 0, ks, ids, vals, counts};
    run_jobs(topk_job, base, rows, threads);
}

/* out[r]: numpy's argmax of row r. */
void ggufrun_argmax_rows(const float *logits, int64_t rows, int64_t v, int64_t stride, int64_t *out, int64_t threads) {
    job_t base = {logits, v, stride, 0, 0, 0, NULL, NULL, NULL, out};
    run_jobs(argmax_job, base, rows, threads);
}

/* llama.h's llama_token_data and llama_token_data_array, as the installed llama.cpp lays them out;
 * native.py checks the sizes and offsets against llama-cpp-python's ctypes definitions first. */
typedef struct {
    int32_t id;
    float logit;
    float p;
} token_data;

typedef struct {
    token_data *data;
    size_t size;
    int64_t selected;
    _Bool sorted;
} token_data_array;

typedef void (*sampler_apply)(void *sampler, token_data_array *cur);

void ggufrun_token_data_layout(int64_t *out) {
    out[0] = sizeof(token_data);
    out[1] = sizeof(token_data_array);
    out[2] = offsetof(token_data_array, size);
    out[3] = offsetof(token_data_array, selected);
    out[4] = offsetof(token_data_array, sorted);
}

/* Per row with a sampler (chains[r]) and candidates (counts[r] >= 0): llama.cpp's chain over those
 * candidates (ids and vals [rows, cap], as ggufrun_topk_candidates writes them), out[r] the token it
 * selects; -1 elsewhere (the caller draws from the whole row). One call for the step's rows instead
 * of a Python round trip each (~10 us a row). */
void ggufrun_draw_rows(void *apply_fn, void **chains, const int32_t *ids, const float *vals, const int64_t *counts,
                       int64_t rows, int64_t cap, int64_t *out) {
    sampler_apply apply = (sampler_apply)apply_fn;
    token_data *buf = (token_data *)malloc(sizeof(token_data) * (size_t)(cap > 0 ? cap : 1));
    for (int64_t r = 0; r < rows; r++) {
        out[r] = -1;
        const int64_t n = counts[r];
        if (!buf || !chains[r] || n <= 0 || n > cap) continue;
        for (int64_t i = 0; i < n; i++) {
            buf[i].id = ids[r * cap + i];
            buf[i].logit = vals[r * cap + i];
            buf[i].p = 0.0f;
        }
        token_data_array cur = {buf, (size_t)n, -1, 0};
        apply(chains[r], &cur);
        /* a sampler may point data elsewhere: read the selection through the array */
        if (cur.selected >= 0 && (size_t)cur.selected < cur.size) out[r] = cur.data[cur.selected].id;
    }
    free(buf);
}

#ifndef GGUFRUN_TOPK_NO_PYTHON
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__topk(void) { return PyModule_Create(&module); }
#endif
