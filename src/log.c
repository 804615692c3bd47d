/*
 * log.c - error recording, logging, status strings, time, version.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Thread_local char last_error[512];

static optiml_log_fn log_fn = NULL;
static void *log_user = NULL;
static optiml_log_level log_min = OPTIML_LOG_LEVEL_INFO;

const char *optiml_status_str(optiml_status status) {
    switch (status) {
    case OPTIML_OK: return "ok";
    case OPTIML_ERR_INVALID_ARG: return "invalid argument";
    case OPTIML_ERR_IO: return "I/O error";
    case OPTIML_ERR_FORMAT: return "corrupt or truncated file";
    case OPTIML_ERR_UNSUPPORTED: return "unsupported";
    case OPTIML_ERR_NOMEM: return "out of memory";
    case OPTIML_ERR_CONTEXT_FULL: return "context full";
    case OPTIML_ERR_INTERNAL: return "internal error";
    case OPTIML_ERR_BACKEND: return "GPU backend error";
    }
    return "unknown status";
}

const char *optiml_last_error(void) { return last_error; }

void optiml_clear_error(void) { last_error[0] = '\0'; }

void optiml_set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
}

optiml_status optiml_fail(optiml_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    optiml_log(OPTIML_LOG_LEVEL_DEBUG, "%s", last_error);
    return status;
}

void optiml_log_set(optiml_log_fn fn, void *user, optiml_log_level min_level) {
    log_fn = fn;
    log_user = user;
    log_min = min_level;
}

void optiml_log(optiml_log_level level, const char *fmt, ...) {
    if (level < log_min) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (log_fn) {
        log_fn(level, buf, log_user);
        return;
    }
    static const char *tag[] = {"debug", "info", "warn", "error"};
    fprintf(stderr, "optiml %s: %s\n", tag[level & 3], buf);
}

void *optiml_alloc_aligned(size_t size) {
    void *p = NULL;
    if (size == 0) size = 64;
    if (posix_memalign(&p, 64, (size + 63) / 64 * 64) != 0) return NULL;
    memset(p, 0, size);
    return p;
}

void optiml_free_aligned(void *p) { free(p); }

const char *optiml_version(void) { return OPTIML_VERSION_STRING; }

int64_t optiml_time_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
