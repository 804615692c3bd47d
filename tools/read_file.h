/*
 * read_file.h - the one file-reading helper the command-line tools share
 * (prompts, texts, calibration data): a whole file in memory.
 */
#ifndef OPTIML_TOOLS_READ_FILE_H
#define OPTIML_TOOLS_READ_FILE_H

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

/* The whole file, malloc'd and NUL-terminated, its length in *len; NULL on
 * failure (errno says why: fopen's, fread's or ENOMEM). */
static inline char *tool_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0, got;
    do {
        if (n + 65536 + 1 > cap) {
            char *nb = realloc(buf, cap = 2 * cap + 65536 + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
    } while (got > 0);
    const bool err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

#endif /* OPTIML_TOOLS_READ_FILE_H */
