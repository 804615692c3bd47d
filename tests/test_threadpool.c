/*
 * test_threadpool - every share of every run is executed exactly once and
 * sees its own (ith, nth), with the workers hot, asleep, or without a core
 * (busy threads on every CPU, so the caller runs shares that no worker
 * claimed); a run's result does not depend on which thread ran a share.
 */
#define _POSIX_C_SOURCE 200809L
#include "test.h"
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_NTH 8
#define N_VALUES 4099

static float values[N_VALUES];

struct job {
    atomic_int count[MAX_NTH];
    int seen_nth[MAX_NTH];
    double part[MAX_NTH];
    int slow_share;  /* this share sleeps 50 us (-1: none) */
};

static void job_fn(void *arg, int ith, int nth) {
    struct job *j = arg;
    atomic_fetch_add(&j->count[ith], 1);
    j->seen_nth[ith] = nth;
    if (ith == j->slow_share) nanosleep(&(struct timespec){0, 50000}, NULL);
    int64_t b, e;
    threadpool_split(N_VALUES, ith, nth, &b, &e);
    double s = 0.0;
    for (int64_t i = b; i < e; i++) s += values[i];
    j->part[ith] = s;
}

/* runs rounds of job_fn; checks exactly-once and the in-order sum of the parts */
static void rounds(struct threadpool *tp, int nth, int n_rounds, int slow_share, double want) {
    int bad_count = 0, bad_sum = 0;
    for (int r = 0; r < n_rounds; r++) {
        struct job j;
        memset(&j, 0, sizeof(j));
        for (int i = 0; i < MAX_NTH; i++) atomic_init(&j.count[i], 0);
        j.slow_share = slow_share;
        threadpool_run(tp, job_fn, &j);
        for (int i = 0; i < MAX_NTH; i++)
            if (atomic_load(&j.count[i]) != (i < nth) || (i < nth && j.seen_nth[i] != nth)) bad_count++;
        double s = 0.0;
        for (int i = 0; i < nth; i++) s += j.part[i];
        if (s != want) bad_sum++;
    }
    CHECK(bad_count == 0, "nth %d slow %d: %d shares not run exactly once with their nth", nth, slow_share,
          bad_count);
    CHECK(bad_sum == 0, "nth %d slow %d: %d rounds summed differently", nth, slow_share, bad_sum);
}

static atomic_bool busy_stop;
static void *busy(void *arg) {
    (void)arg;
    volatile unsigned x = 0;
    while (!atomic_load_explicit(&busy_stop, memory_order_relaxed)) x++;
    return NULL;
}

int main(void) {
    for (int i = 0; i < N_VALUES; i++) values[i] = (float)((i * 2654435761u) % 1000) / 7.0f - 60.0f;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1) ncpu = 1;
    for (int nth = 1; nth <= MAX_NTH; nth++) {
        struct threadpool *tp = NULL;
        CHECK(threadpool_init(nth, &tp) == OPTIML_OK, "init %d", nth);
        if (!tp) continue;
        /* the reference: the same shares summed one after another */
        double want = 0.0;
        {
            struct job j;
            memset(&j, 0, sizeof(j));
            j.slow_share = -1;
            for (int i = 0; i < nth; i++) job_fn(&j, i, nth);
            for (int i = 0; i < nth; i++) want += j.part[i];
        }
        rounds(tp, nth, 3000, -1, want); /* back to back: workers spinning */
        rounds(tp, nth, 50, 0, want);    /* the caller slow: workers claim their shares */
        rounds(tp, nth, 50, nth - 1, want);
        nanosleep(&(struct timespec){0, 20000000}, NULL); /* workers fall asleep */
        rounds(tp, nth, 5, -1, want);
        /* a busy thread on every CPU: workers lose their cores */
        pthread_t th[256];
        int n_busy = 0;
        atomic_store(&busy_stop, false);
        for (long i = 0; i < ncpu && i < 256; i++)
            if (pthread_create(&th[n_busy], NULL, busy, NULL) == 0) n_busy++;
        rounds(tp, nth, 300, -1, want);
        rounds(tp, nth, 20, nth - 1, want);
        atomic_store(&busy_stop, true);
        for (int i = 0; i < n_busy; i++) pthread_join(th[i], NULL);
        threadpool_free(tp);
    }
    return test_summary("test_threadpool");
}
