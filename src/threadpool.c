/*
 * threadpool.c - persistent worker threads (see threadpool.h).
 *
 * A run publishes (fn, arg) and bumps a generation counter; each worker
 * waits for the counter to change (spinning, then sleeping), claims its
 * share for that generation, calls fn and bumps n_done. The caller runs
 * share 0 itself, then runs every share that no worker has claimed yet
 * (a worker still asleep, or without a core: more runnable threads than
 * cores), then spins until the claimed shares are done. A share is claimed
 * once, by its worker or by the caller (compare-and-swap of the worker's
 * last claimed generation), and fn(arg, ith, nth) computes the same thing
 * whichever thread runs it, so results do not depend on who ran what.
 * Without it every round waits for a descheduled worker: test_threadpool
 * (busy threads on every CPU) took 30 s on the 2-core dev machine, 23 s
 * when the caller ran unclaimed shares only after 4096 pauses, 1.2 s as
 * now; 2 threads beside two busy processes once decoded stories260K at 41
 * tokens/s (about 9000 unloaded). 7B q4_0 decode at 2 threads on a quiet
 * machine: the same with and without (3.25 tokens/s, runs alternating).
 */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define THREADPOOL_SPIN 20000 /* pause iterations before a worker sleeps */

struct worker {
    struct threadpool *tp;
    pthread_t thread;
    int ith;
    atomic_uint_fast64_t claimed; /* the last generation whose share was taken */
};

/* Takes share w->ith of generation g unless someone already has. */
static bool claim(struct worker *w, uint64_t g) {
    uint_fast64_t c = atomic_load_explicit(&w->claimed, memory_order_acquire);
    while (c < g)
        if (atomic_compare_exchange_weak_explicit(&w->claimed, &c, g, memory_order_acq_rel, memory_order_acquire))
            return true;
    return false;
}

struct threadpool {
    int n_threads;
    struct worker *workers; /* n_threads - 1 */
    int n_started;

    threadpool_fn fn;
    void *arg;
    atomic_uint_fast64_t gen;
    atomic_int n_done;
    atomic_bool stop;

    pthread_mutex_t mutex;
    pthread_cond_t cond;
};

static void *worker_main(void *p) {
    struct worker *w = p;
    struct threadpool *tp = w->tp;
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&tp->gen, memory_order_acquire) == seen &&
               !atomic_load(&tp->stop)) {
            if (++spins < THREADPOOL_SPIN) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&tp->mutex);
            while (atomic_load(&tp->gen) == seen && !atomic_load(&tp->stop))
                pthread_cond_wait(&tp->cond, &tp->mutex);
            pthread_mutex_unlock(&tp->mutex);
        }
        if (atomic_load(&tp->stop)) break;
        seen = atomic_load_explicit(&tp->gen, memory_order_acquire);
        /* fn and arg belong to generation seen: the caller cannot start the
         * next run before this claimed share is done */
        if (!claim(w, seen)) continue; /* the caller ran it */
        tp->fn(tp->arg, w->ith, tp->n_threads);
        atomic_fetch_add_explicit(&tp->n_done, 1, memory_order_release);
    }
    return NULL;
}

int threadpool_default_threads(void) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 64 ? 64 : (int)n);
}

optiml_status threadpool_init(int n_threads, struct threadpool **out) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "thread count %d out of range 1..1024", n_threads);
    struct threadpool *tp = calloc(1, sizeof(*tp));
    if (!tp) return optiml_fail(OPTIML_ERR_NOMEM, "thread pool: out of memory");
    tp->n_threads = n_threads;
    atomic_init(&tp->gen, 0);
    atomic_init(&tp->n_done, 0);
    atomic_init(&tp->stop, false);
    pthread_mutex_init(&tp->mutex, NULL);
    pthread_cond_init(&tp->cond, NULL);
    if (n_threads > 1) {
        tp->workers = calloc((size_t)n_threads - 1, sizeof(*tp->workers));
        if (!tp->workers) {
            threadpool_free(tp);
            return optiml_fail(OPTIML_ERR_NOMEM, "thread pool: out of memory");
        }
        for (int i = 0; i < n_threads - 1; i++) {
            struct worker *w = &tp->workers[i];
            w->tp = tp;
            w->ith = i + 1;
            atomic_init(&w->claimed, 0);
            if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
                threadpool_free(tp);
                return optiml_fail(OPTIML_ERR_INTERNAL, "thread pool: pthread_create failed for thread %d", i + 1);
            }
            tp->n_started++;
        }
    }
    *out = tp;
    return OPTIML_OK;
}

void threadpool_free(struct threadpool *tp) {
    if (!tp) return;
    pthread_mutex_lock(&tp->mutex);
    atomic_store(&tp->stop, true);
    pthread_cond_broadcast(&tp->cond);
    pthread_mutex_unlock(&tp->mutex);
    for (int i = 0; i < tp->n_started; i++) pthread_join(tp->workers[i].thread, NULL);
    pthread_mutex_destroy(&tp->mutex);
    pthread_cond_destroy(&tp->cond);
    free(tp->workers);
    free(tp);
}

int threadpool_n_threads(const struct threadpool *tp) { return tp->n_threads; }

void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg) {
    if (tp->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->arg = arg;
    atomic_store_explicit(&tp->n_done, 0, memory_order_relaxed);
    pthread_mutex_lock(&tp->mutex);
    const uint64_t g = atomic_fetch_add_explicit(&tp->gen, 1, memory_order_release) + 1;
    pthread_cond_broadcast(&tp->cond);
    pthread_mutex_unlock(&tp->mutex);
    fn(arg, 0, tp->n_threads);
    int ran = 0; /* shares run here for workers that had not claimed them */
    for (int i = 0; i < tp->n_threads - 1; i++)
        if (claim(&tp->workers[i], g)) {
            fn(arg, i + 1, tp->n_threads);
            ran++;
        }
    /* Spin for the claimed shares; yield now and then so that a worker that
     * lost its core (more threads than free cores) can finish. */
    for (int spins = 0; atomic_load_explicit(&tp->n_done, memory_order_acquire) + ran < tp->n_threads - 1; spins++) {
        if (spins % 1024 == 1023) sched_yield();
        else cpu_relax();
    }
}
