/*
 * test.h - the tiny assertion kit of the C tests. Each test program counts
 * its checks, prints every failure with file and line, and ends with
 * test_summary(), which prints "<name>: N checks, N failed" and returns the
 * exit code (non-zero if any check failed or none ran).
 */
#ifndef OPTIML_TEST_H
#define OPTIML_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int test_n_checks;
static int test_n_failed;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        test_n_checks++;                                                          \
        if (!(cond)) {                                                            \
            test_n_failed++;                                                      \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, " " __VA_ARGS__);                                      \
            fputc('\n', stderr);                                                  \
        }                                                                         \
    } while (0)

/* |a - b| <= tol * max(1, |b|) */
#define CHECK_CLOSE(a, b, tol)                                                    \
    do {                                                                          \
        double ca_ = (double)(a), cb_ = (double)(b);                              \
        double lim_ = (tol) * (fabs(cb_) > 1.0 ? fabs(cb_) : 1.0);                \
        CHECK(fabs(ca_ - cb_) <= lim_, "%s = %.9g, %s = %.9g, tol %g", #a, ca_, #b, cb_, \
              (double)(tol));                                                     \
    } while (0)

static inline int test_summary(const char *name) {
    printf("%s: %d checks, %d failed\n", name, test_n_checks, test_n_failed);
    if (test_n_checks == 0) {
        fprintf(stderr, "%s: no checks ran\n", name);
        return 1;
    }
    return test_n_failed ? 1 : 0;
}

#endif /* OPTIML_TEST_H */
