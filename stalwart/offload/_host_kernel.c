/* stalwart host optimizer kernel: element-wise optimizer updates on CPU memory.
 *
 * Built on first use by stalwart/offload/native.py with
 *     -O3 -ffp-contract=off -fno-math-errno
 * (no fused multiply-adds: every operation below is one correctly rounded IEEE fp32
 * operation, in the order written, so the device path - a sequence of single torch ops
 * - produces the same bits). Loops are written for the auto-vectoriser; work is split
 * over a small persistent pthread pool.
 *
 * A call updates a list of segments (one piece of one parameter each). A segment holds
 * the fp32 master weights (updated in place), the gradient (fp32 / bf16 / fp16), the
 * optimizer's state slots, and optionally an output that receives the updated weights
 * converted to the model's dtype. The output may alias the gradient (same dtype, same
 * elements): each block reads its gradient before writing its output.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SW_ABI 5
#define BLK 2048

enum { SW_F32 = 0, SW_BF16 = 1, SW_F16 = 2 };
enum { SW_RULE_ADAM = 0 };

/* Adam flags (same names in native.py) */
#define SW_ADAM_DECOUPLED 1 /* AdamW: p = p * decay */
#define SW_ADAM_L2 2        /* Adam: g = g + p * wd */
#define SW_GSCALE 4         /* g = g * gscale (clipping, loss-scale, maximize) */

typedef struct {
    float *p;        /* fp32 master weights, updated in place */
    const void *g;   /* gradient, dtype gdt */
    float *s0;       /* first state slot (Adam: exp_avg) */
    float *s1;       /* second state slot (Adam: exp_avg_sq) */
    void *out;       /* optional: updated weights in dtype odt (may alias g) */
    int64_t n;
    int32_t gdt;
    int32_t odt;
    int32_t scal;    /* index into the scalar table */
    int32_t pad;
} sw_seg;

typedef struct {
    float gscale, wd, decay, b1, omb1, b2, omb2, inv_bc2_sqrt, eps, step_size;
    int32_t flags;
    int32_t pad;
} sw_adam_scalars;

int sw_abi(void) { return SW_ABI; }
int sw_sizeof_seg(void) { return (int)sizeof(sw_seg); }
int sw_sizeof_adam(void) { return (int)sizeof(sw_adam_scalars); }

/* ---------------------------------------------------------------- conversions */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, like c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void load_grad(float *restrict dst, const void *src, int dt, int64_t k) {
    if (dt == SW_BF16) {
        const uint16_t *restrict h = (const uint16_t *)src;
        for (int64_t i = 0; i < k; i++) dst[i] = bf16_to_f32(h[i]);
    } else {
        const _Float16 *restrict h = (const _Float16 *)src;
        for (int64_t i = 0; i < k; i++) dst[i] = (float)h[i];
    }
}

static void store_out(void *dst, int dt, const float *restrict p, int64_t k) {
    if (dt == SW_F32) {
        memmove(dst, p, (size_t)k * 4);
    } else if (dt == SW_BF16) {
        uint16_t *restrict h = (uint16_t *)dst;
        for (int64_t i = 0; i < k; i++) h[i] = f32_to_bf16(p[i]);
    } else {
        _Float16 *restrict h = (_Float16 *)dst;
        for (int64_t i = 0; i < k; i++) h[i] = (_Float16)p[i];
    }
}

/* ---------------------------------------------------------------- Adam / AdamW */

/* The operation order is the contract with rules.AdamRule.apply (the reference and the
 * device path): change both or neither. The flag tests are loop-invariant: the compiler
 * unswitches them into one vectorised loop per combination. */
static void adam_block(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t k,
                       const sw_adam_scalars *s) {
    const int gsc = s->flags & SW_GSCALE, l2 = s->flags & SW_ADAM_L2, dec = s->flags & SW_ADAM_DECOUPLED;
    const float gs = s->gscale, wd = s->wd, decay = s->decay, b1 = s->b1, omb1 = s->omb1, b2 = s->b2, omb2 = s->omb2;
    const float ibc = s->inv_bc2_sqrt, eps = s->eps, ss = s->step_size;
    for (int64_t i = 0; i < k; i++) {
        float gi = g[i];
        float pi = p[i];
        if (gsc) gi = gi * gs;
        if (l2) gi = gi + pi * wd;
        if (dec) pi = pi * decay;
        const float mi = m[i] * b1 + gi * omb1;
        const float vi = v[i] * b2 + (gi * gi) * omb2;
        const float d = sqrtf(vi) * ibc + eps;
        p[i] = pi - (mi / d) * ss;
        m[i] = mi;
        v[i] = vi;
    }
}

/* fp32 gradients are read in place; bf16/fp16 ones are widened a block at a time into an
 * L1-resident buffer. The output (model dtype) is written after its block's gradient was read. */
static void adam_range(const sw_seg *sg, int64_t lo, int64_t hi, const sw_adam_scalars *tab) {
    const sw_adam_scalars *s = &tab[sg->scal];
    float gbuf[BLK] __attribute__((aligned(64)));
    const int gsz = sg->gdt == SW_F32 ? 4 : 2;
    const int osz = sg->odt == SW_F32 ? 4 : 2;
    for (int64_t i = lo; i < hi; i += BLK) {
        const int64_t k = hi - i < BLK ? hi - i : BLK;
        const void *gsrc = (const char *)sg->g + i * gsz;
        const float *g = (const float *)gsrc;
        if (sg->gdt != SW_F32) {
            load_grad(gbuf, gsrc, sg->gdt, k);
            g = gbuf;
        }
        adam_block(sg->p + i, g, sg->s0 + i, sg->s1 + i, k, s);
        if (sg->out) store_out((char *)sg->out + i * osz, sg->odt, sg->p + i, k);
    }
}

/* ---------------------------------------------------------------- thread pool */

typedef void (*sw_fn)(void *arg, int t, int n);

typedef struct sw_pool {
    int n; /* threads taking part, the caller included */
    pthread_t *th;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t go, done;
    uint64_t gen;
    int remaining, stop;
    sw_fn fn;
    void *arg;
} sw_pool;

typedef struct {
    sw_pool *pool;
    int idx;
    int cpu;
} sw_worker;

static void *worker_main(void *a) {
    sw_worker w = *(sw_worker *)a;
    free(a);
    sw_pool *pool = w.pool;
    if (w.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w.cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    uint64_t seen = 0;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (pool->gen == seen && !pool->stop) pthread_cond_wait(&pool->go, &pool->mu);
        if (pool->stop) break;
        seen = pool->gen;
        sw_fn fn = pool->fn;
        void *arg = pool->arg;
        pthread_mutex_unlock(&pool->mu);
        fn(arg, w.idx, pool->n);
        pthread_mutex_lock(&pool->mu);
        if (--pool->remaining == 0) pthread_cond_signal(&pool->done);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

void sw_pool_destroy(sw_pool *pool);

/* nthreads >= 1 threads in all (nthreads - 1 workers + the caller); workers pinned to
 * cpus[i % ncpus] when ncpus > 0. Returns NULL on failure. */
sw_pool *sw_pool_create(int nthreads, const int *cpus, int ncpus) {
    if (nthreads < 1) return NULL;
    sw_pool *pool = calloc(1, sizeof(sw_pool));
    if (!pool) return NULL;
    pool->n = nthreads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_mutex_init(&pool->run_mu, NULL);
    pthread_cond_init(&pool->go, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->th = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!pool->th) {
        free(pool);
        return NULL;
    }
    for (int i = 1; i < nthreads; i++) {
        sw_worker *w = malloc(sizeof(sw_worker));
        if (!w) {
            pool->n = i;
            sw_pool_destroy(pool);
            return NULL;
        }
        w->pool = pool;
        w->idx = i;
        w->cpu = ncpus > 0 ? cpus[(i - 1) % ncpus] : -1;
        if (pthread_create(&pool->th[i], NULL, worker_main, w) != 0) {
            free(w);
            pool->n = i;
            sw_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
}

void sw_pool_destroy(sw_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    pool->stop = 1;
    pthread_cond_broadcast(&pool->go);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->th[i], NULL);
    pthread_cond_destroy(&pool->go);
    pthread_cond_destroy(&pool->done);
    pthread_mutex_destroy(&pool->mu);
    pthread_mutex_destroy(&pool->run_mu);
    free(pool->th);
    free(pool);
}

int sw_pool_threads(const sw_pool *pool) { return pool->n; }

static void pool_run(sw_pool *pool, sw_fn fn, void *arg) {
    pthread_mutex_lock(&pool->run_mu); /* one job at a time, whichever thread calls */
    if (pool->n > 1) {
        pthread_mutex_lock(&pool->mu);
        pool->fn = fn;
        pool->arg = arg;
        pool->remaining = pool->n - 1;
        pool->gen++;
        pthread_cond_broadcast(&pool->go);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(arg, 0, pool->n);
    if (pool->n > 1) {
        pthread_mutex_lock(&pool->mu);
        while (pool->remaining) pthread_cond_wait(&pool->done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
    }
    pthread_mutex_unlock(&pool->run_mu);
}

/* ---------------------------------------------------------------- jobs */

typedef struct {
    const sw_seg *segs;
    const int64_t *start; /* start[i]: offset of segment i in the concatenation; start[nseg] = total */
    int nseg;
    int64_t total;
    const void *scalars;
    int rule;
    int64_t next; /* next chunk to take (atomic) */
} sw_job;

#define CHUNK 65536 /* elements a thread takes at a time: a preempted thread holds up one chunk, not a share */

static void run_range(const sw_job *job, int64_t lo, int64_t hi) {
    int a = 0, b = job->nseg; /* the segment holding lo: last i with start[i] <= lo */
    while (b - a > 1) {
        const int mid = (a + b) / 2;
        if (job->start[mid] <= lo) a = mid; else b = mid;
    }
    for (int i = a; i < job->nseg && job->start[i] < hi; i++) {
        const int64_t s0 = job->start[i];
        const int64_t a0 = lo > s0 ? lo - s0 : 0;
        const int64_t a1 = hi - s0 < job->segs[i].n ? hi - s0 : job->segs[i].n;
        if (a0 < a1 && job->rule == SW_RULE_ADAM) adam_range(&job->segs[i], a0, a1, (const sw_adam_scalars *)job->scalars);
    }
}

/* Every thread takes chunks of the concatenated segments until none is left. */
static void job_part(void *arg, int t, int n) {
    sw_job *job = (sw_job *)arg;
    (void)t;
    (void)n;
    for (;;) {
        const int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        const int64_t lo = c * CHUNK;
        if (lo >= job->total) break;
        run_range(job, lo, lo + CHUNK < job->total ? lo + CHUNK : job->total);
    }
}

/* Update every segment with rule `rule`; scalars is that rule's scalar table. */
int sw_step(sw_pool *pool, int rule, const sw_seg *segs, int nseg, const void *scalars) {
    if (!pool || rule != SW_RULE_ADAM || nseg < 0) return -1;
    int64_t total = 0;
    for (int i = 0; i < nseg; i++) {
        if (segs[i].n < 0 || !segs[i].p || !segs[i].g || !segs[i].s0 || !segs[i].s1) return -2;
        if (segs[i].gdt < SW_F32 || segs[i].gdt > SW_F16 || segs[i].odt < SW_F32 || segs[i].odt > SW_F16) return -3;
        total += segs[i].n;
    }
    if (total == 0) return 0;
    int64_t *start = malloc(sizeof(int64_t) * ((size_t)nseg + 1));
    if (!start) return -4;
    start[0] = 0;
    for (int i = 0; i < nseg; i++) start[i + 1] = start[i] + segs[i].n;
    sw_job job = {segs, start, nseg, total, scalars, rule, 0};
    if (total <= CHUNK || pool->n == 1) /* not worth waking the pool */
        run_range(&job, 0, total);
    else
        pool_run(pool, job_part, &job);
    free(start);
    return 0;
}
