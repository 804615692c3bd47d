/*
 * parse_num.h - the number parser the command-line tools share for option
 * values.
 */
#ifndef OPTIML_TOOLS_PARSE_NUM_H
#define OPTIML_TOOLS_PARSE_NUM_H

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

/* s as a number in [lo, hi] (the whole string, no NaN); false otherwise. */
static inline bool tool_parse_double(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    const double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return false;
    *out = v;
    return true;
}

#endif /* OPTIML_TOOLS_PARSE_NUM_H */
