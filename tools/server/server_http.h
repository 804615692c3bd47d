/*
 * server_http.h - optiml-server's HTTP front end (server_http.c): the
 * shared application state and the libmicrohttpd daemon start.
 */
#ifndef OPTIML_SERVER_HTTP_H
#define OPTIML_SERVER_HTTP_H

#include "server.h"

#include <microhttpd.h>

typedef struct srv_app {
    const optiml_model *model;
    srv_sched *sched;
    const char *api_key;       /* NULL: no key needed                          */
    const char *chat_template; /* NULL: the model's; else a built-in name/text */
    const char *model_name;    /* the id /v1/models reports                    */
    const char *model_path;
    size_t body_max; /* request body limit in bytes                  */
    double timeout_s;
    int64_t t_created; /* Unix time the server started                 */
    int n_active;      /* generation responses in flight (atomic)      */
} srv_app;

/* Wait until no generation response is in flight (at most timeout_s), so
 * stopping the daemon does not cut off final events. */
void srv_http_drain(srv_app *app, double timeout_s);

/* Listen on host:port (port 0: any free port, written to *bound_port) with
 * one thread per connection. NULL with err filled on failure. */
struct MHD_Daemon *srv_http_start(srv_app *app, const char *host, int port, int *bound_port, char *err,
                                  size_t err_size);

#endif /* OPTIML_SERVER_HTTP_H */
