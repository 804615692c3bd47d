/*
 * common.h - internal helpers shared by every library source file:
 * error recording (optiml_last_error), logging, small math and overflow
 * helpers. Not installed; tools include only include/optiml.h except the
 * converter and tests, which also use the internal gguf/dtype headers.
 */
#ifndef OPTIML_COMMON_H
#define OPTIML_COMMON_H

#include "optiml.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define OPTIML_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define OPTIML_PRINTF(a, b)
#endif

/* Record the reason for a failure (thread-local, read by optiml_last_error)
 * and log it at DEBUG level (the caller decides how to report it). Returns
 * status so callers can write
 *     return optiml_fail(OPTIML_ERR_FORMAT, "%s: bad magic", path);       */
optiml_status optiml_fail(optiml_status status, const char *fmt, ...) OPTIML_PRINTF(2, 3);
/* Record a reason without logging. */
void optiml_set_error(const char *fmt, ...) OPTIML_PRINTF(1, 2);
void optiml_clear_error(void);

void optiml_log(optiml_log_level level, const char *fmt, ...) OPTIML_PRINTF(2, 3);
#define LOG_DEBUG(...) optiml_log(OPTIML_LOG_LEVEL_DEBUG, __VA_ARGS__)
#define LOG_INFO(...)  optiml_log(OPTIML_LOG_LEVEL_INFO, __VA_ARGS__)
#define LOG_WARN(...)  optiml_log(OPTIML_LOG_LEVEL_WARN, __VA_ARGS__)
#define LOG_ERROR(...) optiml_log(OPTIML_LOG_LEVEL_ERROR, __VA_ARGS__)

/* Propagate a non-OK status. */
#define TRY(expr)                                   \
    do {                                            \
        optiml_status try_st_ = (expr);             \
        if (try_st_ != OPTIML_OK) return try_st_;   \
    } while (0)

/* a * b without overflow; false if it would overflow. */
static inline bool mul_u64_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool add_u64_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}
static inline uint64_t align_up_u64(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Aligned allocation for buffers kernels read with SIMD loads (64 bytes).
 * Zero-filled. Free with optiml_free_aligned. */
void *optiml_alloc_aligned(size_t size);
void optiml_free_aligned(void *p);

#endif /* OPTIML_COMMON_H */
