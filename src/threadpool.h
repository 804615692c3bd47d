/*
 * threadpool.h - a persistent pool of worker threads for CPU ops.
 *
 * threadpool_run(tp, fn, arg) calls fn(arg, ith, nth) once for every ith in
 * 0..nth-1 and returns when all have finished: ith = 0 on the calling
 * thread, ith = i on worker i, or also on the calling thread when worker i
 * has not picked its share up by the time the caller is done with its own
 * (a worker asleep or without a core). So fn must not depend on which
 * thread runs it (no thread-local state, no waiting for another share).
 * Workers spin briefly between runs (ops of one forward pass follow each
 * other within microseconds), then sleep on a condition variable, so an
 * idle pool costs no CPU. One thread at a time may call threadpool_run on a
 * pool; the pool is owned by one context.
 */
#ifndef OPTIML_THREADPOOL_H
#define OPTIML_THREADPOOL_H

#include "common.h"

struct threadpool;

typedef void (*threadpool_fn)(void *arg, int ith, int nth);

/* The online CPUs, 1..64: the thread count when none is asked for. */
int threadpool_default_threads(void);

/* n_threads >= 1 (1 = no worker threads: run() calls fn inline). */
optiml_status threadpool_init(int n_threads, struct threadpool **out);
void threadpool_free(struct threadpool *tp); /* NULL is a no-op */
int threadpool_n_threads(const struct threadpool *tp);
void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg);

/* The [begin, end) share of n items for thread ith of nth. */
static inline void threadpool_split(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    int64_t per = (n + nth - 1) / nth;
    int64_t b = per * ith;
    int64_t e = b + per;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

#endif /* OPTIML_THREADPOOL_H */
