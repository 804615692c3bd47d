/*
 * replay.c - runs a fuzz target's LLVMFuzzerTestOneInput over every file
 * named on the command line and every file inside named directories
 * (recursively), so a target runs under gcc sanitizers and ctest without
 * libFuzzer. Exits non-zero if a path cannot be read.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Read the whole file into an exact-size buffer (overreads hit ASan). */
static int replay_file(const char *path, const struct stat *st) {
    size_t size = (size_t)st->st_size;
    uint8_t *buf = malloc(size ? size : 1);
    FILE *fp = fopen(path, "rb");
    int ok = buf && fp && fread(buf, 1, size, fp) == size;
    if (fp) fclose(fp);
    if (ok) LLVMFuzzerTestOneInput(buf, size);
    else fprintf(stderr, "replay: cannot read %s\n", path);
    free(buf);
    return ok ? 1 : -1;
}

/* Number of inputs replayed under path, or -1 on a read error. */
static long replay_path(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "replay: cannot stat %s\n", path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) return replay_file(path, &st);
    DIR *d = opendir(path);
    struct dirent *e;
    long n = 0;
    while (d && n >= 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        char *child = malloc(len);
        if (!child) return -1;
        snprintf(child, len, "%s/%s", path, e->d_name);
        long k = replay_path(child);
        n = k < 0 ? -1 : n + k;
        free(child);
    }
    if (d) closedir(d);
    return d ? n : -1;
}

int main(int argc, char **argv) {
    long total = 0;
    int failed = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIR...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        long n = replay_path(argv[i]);
        if (n < 0) failed = 1;
        else total += n;
    }
    printf("replayed %ld inputs\n", total);
    return failed;
}
