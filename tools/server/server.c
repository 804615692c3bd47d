/*
 * server.c - optiml-server: an HTTP server with llama.cpp- and
 * OpenAI-compatible endpoints and a web UI, serving one model with N
 * parallel slots (continuous batching).
 *
 *   optiml-server -m MODEL [--host 127.0.0.1] [--port 8080] [-c N]
 *       [--parallel N] [-t N] [--api-key KEY] [--chat-template NAME|FILE]
 *       [--timeout S] [--queue N] [--body-limit BYTES] [--alias NAME]
 *
 * main parses the flags, loads the model, starts the scheduler
 * (server_sched.c) and the HTTP daemon (server_http.c), then waits for
 * SIGINT/SIGTERM: it stops accepting connections, lets running requests
 * finish for a grace period, cancels the rest, and exits 0.
 */
#define _POSIX_C_SOURCE 200809L
#include "../parse_num.h"
#include "server_http.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- flags ---------------------------------------------------------------------- */

typedef struct server_args {
    const char *model, *host, *api_key, *chat_template, *alias;
    int port;
    srv_sched_params sp;
    size_t body_max;
    double grace_s;
    int32_t n_gpu_layers;
    double vram_budget;
    bool no_mmap;
    bool no_repack;
} server_args;

static void usage(FILE *f) {
    fprintf(f, "usage: optiml-server -m MODEL [options]\n"
               "  -m, --model PATH        GGUF model\n"
               "  --host ADDR             address to bind (default 127.0.0.1; 0.0.0.0 for every interface)\n"
               "  --port N                port (default 8080; 0 picks a free one)\n"
               "  -c, --ctx-size N        KV-cache cells shared by the slots (default: the model's context)\n"
               "  -np, --parallel N       slots decoded together (default 1, at most 64)\n"
               "  -t, --threads N         CPU threads (default: all cores)\n"
               "  -ngl, --n-gpu-layers N  CUDA builds: the last N layers on the GPU (more than the model has, or\n"
               "                          -1: the output head too)\n"
               "  --vram-budget GIB       CUDA builds: offload the most layers that fit GIB of VRAM\n"
               "  --no-mmap               read the model into memory (huge pages where the OS gives them)\n"
               "  --no-repack             multiply q4_0/q4_k weights from the file's rows, not a copy repacked at\n"
               "                          load for the CPU kernels (faster load, slower decode)\n"
               "  --api-key KEY           require 'Authorization: Bearer KEY' (all endpoints but /health and /)\n"
               "  --chat-template T       built-in name (llama2, llama3, chatml, mistral, gemma, phi3) or a file\n"
               "                          holding a Jinja template (default: the model's)\n"
               "  --timeout S             seconds a request may take, queue included (default 600; 0: none)\n"
               "  --queue N               requests that may wait for a slot (default 64)\n"
               "  --body-limit BYTES      largest request body (default 8 MiB)\n"
               "  --grace S               on SIGINT/SIGTERM, let running requests finish this long (default 5)\n"
               "  --alias NAME            model id for /v1/models (default: the file name)\n");
}

static bool parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static int parse_args(int argc, char **argv, server_args *a) {
    memset(a, 0, sizeof(*a));
    a->host = "127.0.0.1";
    a->port = 8080;
    a->sp.n_parallel = 1;
    a->sp.queue_max = 64;
    a->sp.timeout_s = 600;
    a->body_max = 8u << 20;
    a->grace_s = 5;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(f, "--no-mmap")) {
            a->no_mmap = true;
            continue;
        }
        if (!strcmp(f, "--no-repack")) {
            a->no_repack = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "optiml-server: unknown flag or missing value: %s\n", f);
            usage(stderr);
            return 1;
        }
        const char *v = argv[++i];
        long n = 0;
        double d = 0;
        bool ok = true;
        if (!strcmp(f, "-m") || !strcmp(f, "--model"))
            a->model = v;
        else if (!strcmp(f, "--host"))
            a->host = v;
        else if (!strcmp(f, "--port"))
            ok = parse_int(v, 0, 65535, &n), a->port = (int)n;
        else if (!strcmp(f, "-c") || !strcmp(f, "--ctx-size"))
            ok = parse_int(v, 0, 1 << 24, &n), a->sp.n_ctx = (int32_t)n;
        else if (!strcmp(f, "-np") || !strcmp(f, "--parallel"))
            ok = parse_int(v, 1, 64, &n), a->sp.n_parallel = (int32_t)n;
        else if (!strcmp(f, "-t") || !strcmp(f, "--threads"))
            ok = parse_int(v, 1, 1024, &n), a->sp.n_threads = (int32_t)n;
        else if (!strcmp(f, "-ngl") || !strcmp(f, "--n-gpu-layers"))
            ok = parse_int(v, -1, 1 << 20, &n), a->n_gpu_layers = (int32_t)n;
        else if (!strcmp(f, "--vram-budget"))
            ok = tool_parse_double(v, 1e-3, 1e6, &a->vram_budget);
        else if (!strcmp(f, "--api-key"))
            a->api_key = v;
        else if (!strcmp(f, "--chat-template"))
            a->chat_template = v;
        else if (!strcmp(f, "--timeout"))
            ok = tool_parse_double(v, 0, 1e7, &a->sp.timeout_s);
        else if (!strcmp(f, "--queue"))
            ok = parse_int(v, 0, 100000, &n), a->sp.queue_max = (int32_t)n;
        else if (!strcmp(f, "--body-limit"))
            ok = parse_int(v, 1024, 1L << 30, &n), a->body_max = (size_t)n;
        else if (!strcmp(f, "--grace"))
            ok = tool_parse_double(v, 0, 3600, &d), a->grace_s = d;
        else if (!strcmp(f, "--alias"))
            a->alias = v;
        else {
            fprintf(stderr, "optiml-server: unknown flag: %s\n", f);
            usage(stderr);
            return 1;
        }
        if (!ok) {
            fprintf(stderr, "optiml-server: bad value for %s: '%s'\n", f, v);
            return 1;
        }
    }
    if (!a->model) {
        fprintf(stderr, "optiml-server: give a model with -m\n");
        usage(stderr);
        return 1;
    }
    if (a->api_key && !a->api_key[0]) a->api_key = NULL;
    return 0;
}

/* --chat-template: a built-in name stays a name; anything else is a file
 * whose text is the template. Returns malloc'd text, or NULL (err set). */
static char *load_chat_template(const char *arg, char *err, size_t err_size) {
    static const char *builtin[] = {"llama2", "llama3", "chatml", "mistral", "gemma", "phi3"};
    for (size_t i = 0; i < sizeof(builtin) / sizeof(builtin[0]); i++)
        if (!strcmp(arg, builtin[i])) return strdup(arg);
    FILE *f = fopen(arg, "rb");
    if (!f) {
        snprintf(err, err_size, "--chat-template '%s' is neither a built-in name nor a readable file: %s", arg,
                 strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            char *p = realloc(buf, cap = cap * 2 + 8192);
            if (!p) break;
            buf = p;
        }
        size_t n = fread(buf + len, 1, 4096, f);
        len += n;
        if (n < 4096) break;
    }
    fclose(f);
    if (!buf || len > (1u << 20)) {
        free(buf);
        snprintf(err, err_size, "--chat-template '%s': unreadable or larger than 1 MiB", arg);
        return NULL;
    }
    buf[len] = 0;
    return buf;
}

/* ---- main ------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    server_args a;
    if (parse_args(argc, argv, &a)) return 1;
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);

    /* signals are taken by sigwait in this thread; every thread started
     * below inherits the mask */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[512];
    char *tmpl = NULL;
    if (a.chat_template && !(tmpl = load_chat_template(a.chat_template, err, sizeof(err)))) {
        fprintf(stderr, "optiml-server: %s\n", err);
        return 1;
    }
    optiml_model *model = NULL;
    optiml_model_params mp = optiml_model_default_params();
    mp.n_gpu_layers = a.n_gpu_layers;
    mp.vram_budget_gib = a.vram_budget;
    mp.use_mmap = !a.no_mmap;
    mp.repack = !a.no_repack;
    if (optiml_model_load(a.model, &mp, &model) != OPTIML_OK) {
        fprintf(stderr, "optiml-server: %s\n", optiml_last_error());
        free(tmpl);
        return 1;
    }
    /* check the chat template once, so a bad one fails at start */
    optiml_chat_message probe[] = {{"system", "s"}, {"user", "u"}};
    char probe_buf[256];
    bool chat_ok = optiml_chat_apply_template(model, tmpl, probe, 2, true, probe_buf, sizeof(probe_buf)) != INT32_MIN;
    if (!chat_ok && tmpl) {
        fprintf(stderr, "optiml-server: --chat-template: %s\n", optiml_last_error());
        optiml_model_free(model);
        free(tmpl);
        return 1;
    }
    if (!chat_ok)
        fprintf(stderr,
                "optiml-server: warning: no usable chat template (%s); /v1/chat/completions will fail "
                "until you pass --chat-template\n",
                optiml_last_error());

    srv_sched *sched = srv_sched_start(model, &a.sp, err, sizeof(err));
    if (!sched) {
        fprintf(stderr, "optiml-server: %s\n", err);
        optiml_model_free(model);
        free(tmpl);
        return 1;
    }
    const char *base = strrchr(a.model, '/');
    srv_app app = {
        .model = model,
        .sched = sched,
        .api_key = a.api_key,
        .chat_template = tmpl,
        .model_name = a.alias ? a.alias
                      : base  ? base + 1
                              : a.model,
        .model_path = a.model,
        .body_max = a.body_max,
        .timeout_s = a.sp.timeout_s,
        .t_created = (int64_t)time(NULL),
    };
    int port = 0;
    struct MHD_Daemon *d = srv_http_start(&app, a.host, a.port, &port, err, sizeof(err));
    if (!d) {
        fprintf(stderr, "optiml-server: %s\n", err);
        srv_sched_free(sched);
        optiml_model_free(model);
        free(tmpl);
        return 1;
    }
    char desc[128];
    optiml_model_desc(model, desc, sizeof(desc));
    fprintf(stderr, "optiml-server: %s (%s), %d slots of %d tokens, %s kernels\n", app.model_name, desc,
            srv_sched_n_slots(sched), srv_sched_n_ctx_slot(sched), optiml_cpu_features());
    fprintf(stderr, "optiml-server: listening on http://%s%s%s:%d\n", strchr(a.host, ':') ? "[" : "", a.host,
            strchr(a.host, ':') ? "]" : "", port);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "optiml-server: %s: shutting down (running requests get %g s)\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM", a.grace_s);
    MHD_socket listen_fd = MHD_quiesce_daemon(d); /* no new connections */
    if (listen_fd != MHD_INVALID_SOCKET) close(listen_fd);
    srv_sched_shutdown(sched, a.grace_s); /* finish or cancel every task */
    srv_http_drain(&app, 10);             /* let handlers send the endings */
    MHD_stop_daemon(d);                   /* closes idle connections */
    srv_sched_free(sched);
    optiml_model_free(model);
    free(tmpl);
    fprintf(stderr, "optiml-server: stopped\n");
    return 0;
}
