/*
 * openloop.c - a small HTTP/1.1 load generator for loopback benchmarks (Linux, epoll, one thread).
 *
 * Open loop (--rate R > 0): request k is scheduled at t0 + k/R. At that time it goes to an idle
 * keep-alive connection, or waits in a FIFO backlog until one frees up. Latency is measured from the
 * scheduled time (free of coordinated omission, like wrk2); service time from the actual send.
 * Closed loop (--rate 0): every connection sends its next request as soon as the previous response
 * has arrived (like wrk); latency = service time.
 *
 *   gcc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -o openloop openloop.c -lm
 *   openloop --host 127.0.0.1 --port 8000 --requests FILE --connections 32 --rate 5000 \
 *            --duration 10 --warmup 2 --out result.json [--timeout 10] [--progress]
 *
 * The requests file holds complete raw HTTP/1.1 requests, each preceded by its length as a 4-byte
 * little-endian unsigned integer; request k uses record k % n. See README.md for the JSON output.
 *
 * Exit status: 0 run completed (HTTP errors included), 1 could not connect at all, 2 bad usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 35)
#define HAVE_EPOLL_PWAIT2 1
#endif
#endif

#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
#define RBUF_SIZE 65536          /* per-connection read buffer; a response head must fit in it */
#define MAX_CHUNK_LINE 4096      /* longest chunk-size line accepted */
#define HIST_MAX_US 100000000ULL /* 100 s: larger values are clamped to this bucket */
#define HIST_SIZE (17 * 1024 + 1024)
#define NSTATUS 1000
#define MAX_EVENTS 256
#define MAX_BACKOFF_NS (100 * NS_PER_MS)

enum { E_CONNECT, E_READ, E_WRITE, E_TIMEOUT, E_PARSE, E_COUNT };
static const char *const ERR_NAMES[E_COUNT] = {"connect", "read", "write", "timeout", "parse"};

enum { C_DOWN, C_CONNECTING, C_IDLE, C_BUSY };
enum { P_HDR, P_BODY, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF, P_TRAILER, P_BODY_EOF };

typedef struct {
    int fd;
    int state;
    int in_queue; /* an entry for this connection sits in the idle queue (maybe stale) */
    uint32_t gen; /* bumped on every open/close so stale epoll events can be ignored */
    uint32_t events;
    int64_t retry_at, backoff_ns, connect_started;
    /* the request in flight */
    int64_t sched_ns, sent_ns;
    int measured, is_head;
    const char *wbuf;
    size_t wlen, woff;
    /* response parser */
    char *rbuf;
    size_t rlen, rpos, hscan;
    int pstate, status, close_after, chunked, has_cl;
    uint64_t cl, remaining;
} conn_t;

typedef struct {
    const char *data;
    size_t len;
    int is_head;
} request_t;

/* ---- options ---- */
static const char *opt_host = "127.0.0.1";
static long opt_port = -1;
static const char *opt_requests;
static long opt_connections = 32;
static double opt_rate = -1.0, opt_duration = -1.0, opt_warmup = 0.0, opt_timeout = 10.0;
static const char *opt_out;
static int opt_progress, opt_rate_set;

/* ---- state ---- */
static request_t *reqs;
static size_t nreqs;
static char *reqs_blob;
static struct addrinfo *g_addr;
static int epfd = -1;
static conn_t *conns;
static size_t nconns;
static uint32_t *idleq;
static size_t idle_head, idle_count;

static int open_loop, sending, use_pwait2 = 1;
static volatile sig_atomic_t stop_requested;
static int64_t t0, t_meas, t_end, t_stop, timeout_ns;
static double interval_ns;
static uint64_t next_k, disp_k, closed_k; /* open: scheduled so far, dispatched so far; closed: sent */
static uint64_t inflight;

/* measured-phase counters */
static uint64_t scheduled_meas, sent_meas, completed_meas, max_backlog;
static uint64_t errors[E_COUNT];
static uint64_t status_counts[NSTATUS];
static uint64_t lat_hist[HIST_SIZE], svc_hist[HIST_SIZE];
static uint64_t max_lat_us, max_svc_us;
/* whole-run counters (progress lines) */
static uint64_t total_sent, total_completed, total_errors;

static void conn_open(conn_t *c, int64_t now);
static void do_write(conn_t *c);

/* ---------------------------------------------------------------------------------------------- */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static const char USAGE[] =
    "usage: openloop [--host H] --port P --requests FILE [--connections N] --rate R|0 --duration S\n"
    "                [--warmup S] --out FILE|- [--timeout S] [--progress]\n"
    "  --rate R > 0: open loop, R requests/s over all connections; --rate 0: closed loop\n"
    "  defaults: --host 127.0.0.1 --connections 32 --warmup 0 --timeout 10\n";

static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("openloop: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fputs(USAGE, stderr);
    exit(2);
}

static double parse_double(const char *name, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !isfinite(v))
        usage_error("--%s: not a number: '%s'", name, s);
    return v;
}

static long parse_long(const char *name, const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0') usage_error("--%s: not an integer: '%s'", name, s);
    return v;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0) usage_error("unexpected argument '%s'", arg);
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        if (nlen == 4 && strncmp(name, "help", 4) == 0) {
            fputs(USAGE, stdout);
            exit(0);
        }
        if (nlen == 8 && strncmp(name, "progress", 8) == 0) {
            if (eq) usage_error("--progress takes no value");
            opt_progress = 1;
            continue;
        }
        const char *val;
        if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc) usage_error("--%s needs a value", name);
            val = argv[++i];
        }
        char key[32];
        if (nlen >= sizeof key) usage_error("unknown option '%s'", arg);
        memcpy(key, name, nlen);
        key[nlen] = '\0';
        if (!strcmp(key, "host")) opt_host = val;
        else if (!strcmp(key, "port")) opt_port = parse_long(key, val);
        else if (!strcmp(key, "requests")) opt_requests = val;
        else if (!strcmp(key, "connections")) opt_connections = parse_long(key, val);
        else if (!strcmp(key, "rate")) opt_rate = parse_double(key, val), opt_rate_set = 1;
        else if (!strcmp(key, "duration")) opt_duration = parse_double(key, val);
        else if (!strcmp(key, "warmup")) opt_warmup = parse_double(key, val);
        else if (!strcmp(key, "timeout")) opt_timeout = parse_double(key, val);
        else if (!strcmp(key, "out")) opt_out = val;
        else usage_error("unknown option '--%s'", key);
    }
    if (!opt_requests) usage_error("--requests is required");
    if (!opt_out) usage_error("--out is required");
    if (opt_port < 1 || opt_port > 65535) usage_error("--port must be 1..65535");
    if (opt_connections < 1 || opt_connections > 100000) usage_error("--connections must be 1..100000");
    if (!opt_rate_set) usage_error("--rate is required (requests/s over all connections; 0 = closed loop)");
    if (opt_rate < 0) usage_error("--rate must be >= 0");
    if (opt_rate > 0 && opt_rate < 1e-6) usage_error("--rate too small");
    if (opt_duration <= 0 || opt_duration > 1e6) usage_error("--duration must be > 0 seconds");
    if (opt_warmup < 0 || opt_warmup > 1e6) usage_error("--warmup must be >= 0 seconds");
    if (opt_timeout <= 0 || opt_timeout > 1e6) usage_error("--timeout must be > 0 seconds");
    if (!*opt_host) usage_error("--host is empty");
}

/* ---- requests file ---------------------------------------------------------------------------- */

static void bad_requests(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "openloop: bad requests file %s: ", opt_requests);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* Checks one raw request: a request line, a header block ending in CRLF CRLF, and a body whose
 * length agrees with Content-Length (no body without one, unless Transfer-Encoding is used). */
static void check_request(size_t idx, const char *r, size_t len) {
    const char *end = memmem(r, len, "\r\n\r\n", 4);
    if (!end) bad_requests("record %zu: no end of headers (CRLF CRLF)", idx);
    size_t hlen = (size_t)(end - r) + 4;
    const char *eol = memmem(r, hlen, "\r\n", 2);
    const char *sp = memchr(r, ' ', (size_t)(eol - r));
    if (!sp || sp == r || (size_t)(eol - r) < 14 || memcmp(eol - 9, " HTTP/1.", 8) != 0)
        bad_requests("record %zu: bad request line", idx);
    int has_cl = 0, has_te = 0;
    uint64_t cl = 0;
    const char *line = eol + 2;
    while (line < end) {
        const char *le = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(le - line));
        if (!colon || colon == line) bad_requests("record %zu: bad header line", idx);
        size_t nl = (size_t)(colon - line);
        const char *v = colon + 1;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        if (nl == 14 && strncasecmp(line, "content-length", 14) == 0) {
            const char *q = v;
            uint64_t n = 0;
            if (q == le || *q < '0' || *q > '9') bad_requests("record %zu: bad Content-Length", idx);
            while (q < le && *q >= '0' && *q <= '9' && n < 100000000000ULL) n = n * 10 + (uint64_t)(*q++ - '0');
            while (q < le && (*q == ' ' || *q == '\t')) q++;
            if (q != le) bad_requests("record %zu: bad Content-Length", idx);
            has_cl = 1;
            cl = n;
        } else if (nl == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            has_te = 1;
        }
        line = le + 2;
    }
    size_t body = len - hlen;
    if (has_te) return;
    if (has_cl && cl != body)
        bad_requests("record %zu: Content-Length %" PRIu64 " but the body has %zu bytes", idx, cl, body);
    if (!has_cl && body != 0) bad_requests("record %zu: a %zu-byte body without Content-Length", idx, body);
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) bad_requests("%s", strerror(errno));
    size_t cap = 1 << 16, len = 0;
    reqs_blob = malloc(cap);
    if (!reqs_blob) bad_requests("out of memory");
    for (;;) {
        if (len == cap) {
            cap *= 2;
            char *nb = realloc(reqs_blob, cap);
            if (!nb) bad_requests("out of memory");
            reqs_blob = nb;
        }
        size_t n = fread(reqs_blob + len, 1, cap - len, f);
        len += n;
        if (n == 0) break;
    }
    if (ferror(f)) bad_requests("read error");
    fclose(f);
    size_t count = 0, pos = 0;
    while (pos < len) { /* first pass: count and check the framing */
        if (len - pos < 4) bad_requests("%zu trailing byte(s) after record %zu", len - pos, count);
        const unsigned char *p = (const unsigned char *)reqs_blob + pos;
        size_t rl = (size_t)p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16 | (size_t)p[3] << 24;
        if (rl == 0) bad_requests("record %zu has length 0", count);
        if (rl > len - pos - 4)
            bad_requests("record %zu claims %zu bytes but only %zu remain", count, rl, len - pos - 4);
        pos += 4 + rl;
        count++;
    }
    if (count == 0) bad_requests("no records");
    reqs = calloc(count, sizeof *reqs);
    if (!reqs) bad_requests("out of memory");
    pos = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *p = (const unsigned char *)reqs_blob + pos;
        size_t rl = (size_t)p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16 | (size_t)p[3] << 24;
        reqs[i].data = reqs_blob + pos + 4;
        reqs[i].len = rl;
        reqs[i].is_head = rl >= 5 && memcmp(reqs[i].data, "HEAD ", 5) == 0;
        check_request(i, reqs[i].data, rl);
        pos += 4 + rl;
    }
    nreqs = count;
}

/* ---- histograms ------------------------------------------------------------------------------- */

static size_t hist_index(uint64_t v) {
    if (v < 2048) return (size_t)v;
    int e = 63 - __builtin_clzll(v) - 10; /* floor(log2 v) - 10 >= 1 */
    return (size_t)e * 1024 + (size_t)(v >> e);
}

static uint64_t hist_value(size_t idx) {
    if (idx < 2048) return idx;
    size_t e = idx / 1024 - 1;
    return (uint64_t)(idx % 1024 + 1024) << e;
}

static void hist_record(uint64_t *h, int64_t ns, uint64_t *maxv) {
    uint64_t us = ns <= 0 ? 1 : (uint64_t)((ns + 999) / 1000);
    if (us < 1) us = 1;
    if (us > *maxv) *maxv = us;
    if (us > HIST_MAX_US) us = HIST_MAX_US;
    h[hist_index(us)]++;
}

/* ---- connections ------------------------------------------------------------------------------ */

static void reset_parser(conn_t *c) {
    c->pstate = P_HDR;
    c->hscan = 0;
    c->status = 0;
    c->close_after = 0;
    c->chunked = 0;
    c->has_cl = 0;
    c->cl = 0;
    c->remaining = 0;
}

static void set_events(conn_t *c, uint32_t ev) {
    if (c->events == ev) return;
    struct epoll_event e;
    e.events = ev;
    e.data.u64 = (uint64_t)c->gen << 32 | (uint64_t)(c - conns);
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e) == 0) c->events = ev;
}

static void push_idle(conn_t *c) {
    if (c->in_queue) return; /* a (stale) entry is still queued: it is valid again */
    idleq[(idle_head + idle_count) % nconns] = (uint32_t)(c - conns);
    idle_count++;
    c->in_queue = 1;
}

static conn_t *pop_idle(void) {
    while (idle_count > 0) {
        conn_t *c = &conns[idleq[idle_head]];
        idle_head = (idle_head + 1) % nconns;
        idle_count--;
        c->in_queue = 0;
        if (c->state == C_IDLE) return c;
    }
    return NULL;
}

static void conn_close(conn_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->gen++;
    c->state = C_DOWN;
    c->events = 0;
    c->rlen = c->rpos = 0;
    reset_parser(c);
}

static void connect_failed(conn_t *c, int64_t now) {
    errors[E_CONNECT]++;
    total_errors++;
    conn_close(c);
    c->backoff_ns = c->backoff_ns ? c->backoff_ns * 2 : NS_PER_MS;
    if (c->backoff_ns > MAX_BACKOFF_NS) c->backoff_ns = MAX_BACKOFF_NS;
    c->retry_at = now + c->backoff_ns;
}

static void on_connected(conn_t *c) {
    c->state = C_IDLE;
    c->backoff_ns = 0;
    set_events(c, EPOLLIN);
    push_idle(c);
}

static void conn_open(conn_t *c, int64_t now) {
    int fd = socket(g_addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        connect_failed(c, now);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->gen++;
    c->rlen = c->rpos = 0;
    reset_parser(c);
    c->connect_started = now;
    int r = connect(fd, g_addr->ai_addr, g_addr->ai_addrlen);
    if (r != 0 && errno != EINPROGRESS) {
        connect_failed(c, now);
        return;
    }
    struct epoll_event e;
    e.events = r == 0 ? EPOLLIN : EPOLLOUT;
    e.data.u64 = (uint64_t)c->gen << 32 | (uint64_t)(c - conns);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) != 0) {
        connect_failed(c, now);
        return;
    }
    c->events = e.events;
    c->state = C_CONNECTING;
    if (r == 0) on_connected(c);
}

/* Closes the connection and, while the run is sending, opens a new one straight away. */
static void reconnect(conn_t *c, int64_t now) {
    conn_close(c);
    c->retry_at = now;
    if (sending) conn_open(c, now);
}

/* The request in flight on c is lost: count it under `kind` (if it belongs to the measured phase). */
static void fail_request(conn_t *c, int kind) {
    if (c->state != C_BUSY) return;
    if (c->measured) errors[kind]++;
    total_errors++;
    inflight--;
    c->state = C_IDLE;
}

static void start_request(conn_t *c, uint64_t k, int64_t sched, int measured) {
    int64_t t = now_ns();
    const request_t *r = &reqs[k % nreqs];
    c->state = C_BUSY;
    c->sched_ns = sched ? sched : t;
    c->sent_ns = t;
    c->measured = measured;
    c->wbuf = r->data;
    c->wlen = r->len;
    c->woff = 0;
    c->is_head = r->is_head;
    inflight++;
    total_sent++;
    if (measured) sent_meas++;
    do_write(c);
}

static void do_write(conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return;
        }
        fail_request(c, E_WRITE);
        reconnect(c, now_ns());
        return;
    }
    if (c->events & EPOLLOUT) set_events(c, EPOLLIN);
}

/* ---- response parsing ------------------------------------------------------------------------- */

static int token_in_list(const char *v, const char *end, const char *tok, int last_only) {
    size_t tl = strlen(tok);
    int found = 0;
    while (v < end) {
        while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
        const char *s = v;
        while (v < end && *v != ',') v++;
        const char *e = v;
        while (e > s && (e[-1] == ' ' || e[-1] == '\t')) e--;
        if (e == s) continue;
        int match = (size_t)(e - s) == tl && strncasecmp(s, tok, tl) == 0;
        if (last_only) found = match;
        else if (match) return 1;
    }
    return found;
}

/* Parses the status line and the header fields of one response head [p, p+hlen). */
static int parse_head(conn_t *c, const char *p, size_t hlen) {
    const char *end = p + hlen - 2; /* points at the final CRLF */
    const char *eol = memmem(p, hlen, "\r\n", 2);
    size_t sl = (size_t)(eol - p);
    if (sl < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ') return -1;
    if (p[9] < '1' || p[9] > '9' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9') return -1;
    if (sl > 12 && p[12] != ' ') return -1;
    c->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    int http10 = p[7] == '0', keep_alive = 0, te = 0;
    c->close_after = 0;
    c->chunked = 0;
    c->has_cl = 0;
    const char *line = eol + 2;
    while (line < end) {
        const char *le = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        if (*line == ' ' || *line == '\t') { /* obsolete line folding: ignore */
            line = le + 2;
            continue;
        }
        const char *colon = memchr(line, ':', (size_t)(le - line));
        if (!colon || colon == line) return -1;
        size_t nl = (size_t)(colon - line);
        const char *v = colon + 1;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        const char *ve = le;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        if (nl == 14 && strncasecmp(line, "content-length", 14) == 0) {
            uint64_t n = 0;
            const char *q = v;
            if (q == ve) return -1;
            for (; q < ve; q++) {
                if (*q < '0' || *q > '9' || n > 100000000000000ULL) return -1;
                n = n * 10 + (uint64_t)(*q - '0');
            }
            if (c->has_cl && c->cl != n) return -1;
            c->has_cl = 1;
            c->cl = n;
        } else if (nl == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            te = 1;
            c->chunked = token_in_list(v, ve, "chunked", 1);
        } else if (nl == 10 && strncasecmp(line, "connection", 10) == 0) {
            if (token_in_list(v, ve, "close", 0)) c->close_after = 1;
            if (token_in_list(v, ve, "keep-alive", 0)) keep_alive = 1;
        }
        line = le + 2;
    }
    if (te && !c->chunked) c->has_cl = 0; /* a body that is not chunked: read until the close */
    if (http10 && !keep_alive) c->close_after = 1;
    return 0;
}

/* Returns 1 when a whole response has been read, 0 when more bytes are needed, -1 if malformed. */
static int parse(conn_t *c) {
    for (;;) {
        const char *p = c->rbuf + c->rpos;
        size_t avail = c->rlen - c->rpos;
        switch (c->pstate) {
        case P_HDR: {
            size_t start = c->hscan > 3 ? c->hscan - 3 : 0;
            const char *e = avail > start ? memmem(p + start, avail - start, "\r\n\r\n", 4) : NULL;
            if (!e) {
                c->hscan = avail;
                return avail >= RBUF_SIZE ? -1 : 0;
            }
            size_t hlen = (size_t)(e - p) + 4;
            if (parse_head(c, p, hlen) < 0) return -1;
            c->rpos += hlen;
            c->hscan = 0;
            if (c->status < 200) {
                if (c->status == 101) return -1; /* no upgrades here */
                continue;                        /* an interim response: the final one follows */
            }
            if (c->is_head || c->status == 204 || c->status == 304) return 1;
            if (c->chunked) {
                c->pstate = P_CHUNK_SIZE;
            } else if (c->has_cl) {
                if (c->cl == 0) return 1;
                c->remaining = c->cl;
                c->pstate = P_BODY;
            } else {
                c->pstate = P_BODY_EOF;
                c->close_after = 1;
            }
            break;
        }
        case P_BODY:
        case P_CHUNK_DATA: {
            size_t take = avail < c->remaining ? avail : (size_t)c->remaining;
            c->rpos += take;
            c->remaining -= take;
            if (c->remaining) return 0;
            if (c->pstate == P_BODY) return 1;
            c->pstate = P_CHUNK_CRLF;
            break;
        }
        case P_CHUNK_CRLF:
            if (avail < 2) return 0;
            if (p[0] != '\r' || p[1] != '\n') return -1;
            c->rpos += 2;
            c->pstate = P_CHUNK_SIZE;
            break;
        case P_CHUNK_SIZE: {
            const char *nl = memmem(p, avail, "\r\n", 2);
            if (!nl) return avail > MAX_CHUNK_LINE ? -1 : 0;
            const char *q = p;
            uint64_t size = 0;
            int digits = 0;
            for (; q < nl; q++) {
                int d;
                if (*q >= '0' && *q <= '9') d = *q - '0';
                else if (*q >= 'a' && *q <= 'f') d = *q - 'a' + 10;
                else if (*q >= 'A' && *q <= 'F') d = *q - 'A' + 10;
                else break;
                if (++digits > 15) return -1;
                size = size * 16 + (uint64_t)d;
            }
            if (!digits) return -1;
            while (q < nl && (*q == ' ' || *q == '\t')) q++;
            if (q < nl && *q != ';') return -1; /* chunk extensions are ignored */
            c->rpos += (size_t)(nl - p) + 2;
            if (size == 0) {
                c->pstate = P_TRAILER;
            } else {
                c->remaining = size;
                c->pstate = P_CHUNK_DATA;
            }
            break;
        }
        case P_TRAILER: {
            const char *nl = memmem(p, avail, "\r\n", 2);
            if (!nl) return avail >= RBUF_SIZE ? -1 : 0;
            c->rpos += (size_t)(nl - p) + 2;
            if (nl == p) return 1;
            break;
        }
        case P_BODY_EOF:
            c->rpos = c->rlen;
            return 0;
        default:
            return -1;
        }
    }
}

static void on_complete(conn_t *c) {
    int64_t t = now_ns();
    if (c->measured) {
        completed_meas++;
        status_counts[c->status]++;
        hist_record(lat_hist, t - c->sched_ns, &max_lat_us);
        hist_record(svc_hist, t - c->sent_ns, &max_svc_us);
    }
    total_completed++;
    inflight--;
    c->state = C_IDLE;
    int leftover = c->rpos < c->rlen; /* bytes nobody asked for: the framing is off */
    int close_after = c->close_after;
    if (leftover) {
        if (c->measured) errors[E_PARSE]++;
        total_errors++;
    }
    reset_parser(c);
    c->rlen = c->rpos = 0;
    if (leftover || close_after) {
        reconnect(c, t);
        return;
    }
    push_idle(c);
}

static void do_read(conn_t *c) {
    for (;;) {
        if (c->rpos > 0) {
            memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
            c->rlen -= c->rpos;
            c->rpos = 0;
        }
        size_t space = RBUF_SIZE - c->rlen;
        if (space == 0) { /* cannot happen: parse() rejects a head that fills the buffer */
            fail_request(c, E_PARSE);
            reconnect(c, now_ns());
            return;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, space, 0);
        if (n > 0) {
            c->rlen += (size_t)n;
            if (c->state != C_BUSY) { /* unsolicited bytes on an idle connection */
                int64_t t = now_ns();
                if (t >= t_meas && sending) errors[E_PARSE]++;
                total_errors++;
                reconnect(c, t);
                return;
            }
            int r = parse(c);
            if (r < 0) {
                fail_request(c, E_PARSE);
                reconnect(c, now_ns());
                return;
            }
            if (r > 0) {
                on_complete(c);
                return;
            }
            if ((size_t)n < space) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* end of stream or a socket error */
        if (c->state == C_BUSY) {
            if (n == 0 && c->pstate == P_BODY_EOF) {
                on_complete(c); /* the body ran until the close; on_complete reconnects */
                return;
            }
            fail_request(c, E_READ);
        }
        reconnect(c, now_ns());
        return;
    }
}

static void handle_event(const struct epoll_event *ev) {
    conn_t *c = &conns[(uint32_t)(ev->data.u64 & 0xffffffffu)];
    uint32_t gen = (uint32_t)(ev->data.u64 >> 32);
    if (c->fd < 0 || c->gen != gen) return;
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err == 0 && (ev->events & (EPOLLERR | EPOLLHUP))) err = ECONNREFUSED;
        if (err) connect_failed(c, now_ns());
        else if (ev->events & EPOLLOUT) on_connected(c);
        return;
    }
    if ((ev->events & EPOLLOUT) && c->state == C_BUSY && c->woff < c->wlen) {
        do_write(c);
        if (c->fd < 0 || c->gen != gen) return;
    }
    if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR)) do_read(c);
}

/* ---- scheduling ------------------------------------------------------------------------------- */

static int64_t sched_time(uint64_t k) { return t0 + (int64_t)((double)k * interval_ns); }

static void advance_schedule(int64_t now) {
    while (sending) {
        int64_t s = sched_time(next_k);
        if (s > now || s >= t_end) break;
        if (s >= t_meas) scheduled_meas++;
        next_k++;
    }
}

static void dispatch(int64_t now) {
    if (!sending || now >= t_end) return; /* the main loop stops the run at t_end */
    if (open_loop) {
        advance_schedule(now);
        while (disp_k < next_k && idle_count > 0) {
            conn_t *c = pop_idle();
            if (!c) break;
            int64_t s = sched_time(disp_k);
            start_request(c, disp_k, s, s >= t_meas);
            disp_k++;
        }
        /* what is still due now waits for a connection to free up */
        if (now >= t_meas && next_k - disp_k > max_backlog) max_backlog = next_k - disp_k;
    } else {
        size_t guard = 2 * nconns;
        while (idle_count > 0 && guard--) {
            conn_t *c = pop_idle();
            if (!c) break;
            int64_t t = now_ns();
            start_request(c, closed_k++, 0, t >= t_meas);
        }
    }
}

static void housekeeping(int64_t now, size_t *ndown) {
    size_t down = 0;
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == C_BUSY && now - c->sent_ns > timeout_ns) {
            fail_request(c, E_TIMEOUT);
            reconnect(c, now);
        } else if (c->state == C_CONNECTING && now - c->connect_started > timeout_ns) {
            connect_failed(c, now);
        }
        if (c->state == C_DOWN) {
            if (sending && now >= c->retry_at) conn_open(c, now);
            if (c->state == C_DOWN) down++;
        }
    }
    *ndown = down;
}

static int wait_events(struct epoll_event *evs, int64_t timeout) {
    if (timeout < 0) timeout = 0;
#ifdef HAVE_EPOLL_PWAIT2
    if (use_pwait2) {
        struct timespec ts = {(time_t)(timeout / NS_PER_S), (long)(timeout % NS_PER_S)};
        int n = epoll_pwait2(epfd, evs, MAX_EVENTS, &ts, NULL);
        if (n >= 0 || errno != ENOSYS) return n;
        use_pwait2 = 0;
    }
#endif
    /* millisecond resolution: round down (never oversleep); the last partial ms is polled */
    return epoll_wait(epfd, evs, MAX_EVENTS, (int)(timeout / NS_PER_MS));
}

static void on_signal(int sig) {
    (void)sig;
    stop_requested++;
}

/* ---- output ----------------------------------------------------------------------------------- */

static void write_hist(FILE *f, const uint64_t *h) {
    int first = 1;
    fputc('[', f);
    for (size_t i = 0; i < HIST_SIZE; i++) {
        if (!h[i]) continue;
        fprintf(f, "%s[%" PRIu64 ", %" PRIu64 "]", first ? "" : ", ", hist_value(i), h[i]);
        first = 0;
    }
    fputc(']', f);
}

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec / 1e6; }

static int write_json(FILE *f, double duration_s) {
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    getrusage(RUSAGE_SELF, &ru);
    fprintf(f, "{\"mode\": \"%s\", \"rate\": %.15g, \"connections\": %zu, \"duration_s\": %.6f, \"warmup_s\": %.15g,\n",
            open_loop ? "open" : "closed", opt_rate, nconns, duration_s, opt_warmup);
    fprintf(f, " \"scheduled\": %" PRIu64 ", \"sent\": %" PRIu64 ", \"completed\": %" PRIu64
               ", \"max_backlog\": %" PRIu64 ",\n",
            open_loop ? scheduled_meas : sent_meas, sent_meas, completed_meas, max_backlog);
    fputs(" \"status_counts\": {", f);
    int first = 1;
    for (int s = 0; s < NSTATUS; s++) {
        if (!status_counts[s]) continue;
        fprintf(f, "%s\"%d\": %" PRIu64, first ? "" : ", ", s, status_counts[s]);
        first = 0;
    }
    fputs("},\n \"errors\": {", f);
    for (int e = 0; e < E_COUNT; e++)
        fprintf(f, "%s\"%s\": %" PRIu64, e ? ", " : "", ERR_NAMES[e], errors[e]);
    fputs("},\n \"latency_us\": ", f);
    write_hist(f, lat_hist);
    fputs(",\n \"service_us\": ", f);
    write_hist(f, svc_hist);
    fprintf(f, ",\n \"max_latency_us\": %" PRIu64 ", \"max_service_us\": %" PRIu64 ",\n", max_lat_us, max_svc_us);
    fprintf(f, " \"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f}\n", tv_s(ru.ru_utime), tv_s(ru.ru_stime));
    if (fflush(f) != 0 || ferror(f)) return -1;
    return 0;
}

static void finish(FILE *out, double duration_s, int code) {
    int bad = write_json(out, duration_s) != 0;
    if (out != stdout && fclose(out) != 0) bad = 1;
    if (bad) {
        fprintf(stderr, "openloop: could not write %s: %s\n", opt_out, strerror(errno));
        if (code == 0) code = 1;
    }
    exit(code);
}

/* ---- main ------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    parse_args(argc, argv);
    load_requests(opt_requests);

    FILE *out = strcmp(opt_out, "-") == 0 ? stdout : fopen(opt_out, "w");
    if (!out) usage_error("cannot open --out %s: %s", opt_out, strerror(errno));

    char portstr[16];
    snprintf(portstr, sizeof portstr, "%ld", opt_port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(opt_host, portstr, &hints, &g_addr);
    if (gai != 0) {
        fprintf(stderr, "openloop: cannot resolve %s: %s\n", opt_host, gai_strerror(gai));
        errors[E_CONNECT] = 1;
        finish(out, 0.0, 1);
    }
    /* A name such as "localhost" may give ::1 and 127.0.0.1: use the first address that accepts. */
    for (struct addrinfo *ai = g_addr; ai && g_addr->ai_next; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int ok = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
        if (fd >= 0) close(fd);
        if (ok) {
            g_addr = ai;
            break;
        }
    }

    nconns = (size_t)opt_connections;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 32) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)nconns + 32 ? (rlim_t)nconns + 32
                                                                                        : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); /* precise timer wake-ups */

    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc(nconns, sizeof *conns);
    idleq = calloc(nconns, sizeof *idleq);
    if (epfd < 0 || !conns || !idleq) {
        fprintf(stderr, "openloop: out of resources\n");
        return 2;
    }
    for (size_t i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].rbuf = malloc(RBUF_SIZE);
        if (!conns[i].rbuf) {
            fprintf(stderr, "openloop: out of memory\n");
            return 2;
        }
    }
    open_loop = opt_rate > 0;
    interval_ns = open_loop ? 1e9 / opt_rate : 0.0;
    timeout_ns = (int64_t)(opt_timeout * 1e9);
    struct epoll_event evs[MAX_EVENTS];

    /* Connect every connection before the clock starts. */
    int64_t now = now_ns();
    t_meas = INT64_MAX; /* nothing is measured yet */
    for (size_t i = 0; i < nconns; i++) conn_open(&conns[i], now);
    int64_t deadline = now + timeout_ns;
    for (;;) {
        size_t connecting = 0;
        for (size_t i = 0; i < nconns; i++) connecting += conns[i].state == C_CONNECTING;
        now = now_ns();
        if (!connecting || now >= deadline || stop_requested) break;
        int n = wait_events(evs, deadline - now);
        for (int i = 0; i < n; i++) handle_event(&evs[i]);
    }
    size_t up = 0;
    for (size_t i = 0; i < nconns; i++) {
        if (conns[i].state == C_CONNECTING) connect_failed(&conns[i], now);
        up += conns[i].state == C_IDLE;
    }
    if (up == 0) {
        fprintf(stderr, "openloop: could not connect to %s port %ld\n", opt_host, opt_port);
        finish(out, 0.0, 1);
    }
    if (up < nconns) fprintf(stderr, "openloop: only %zu of %zu connections are up; retrying the rest\n", up, nconns);

    /* The run: warm-up, then the measured phase, then the drain. */
    sending = 1;
    t0 = now_ns();
    t_meas = t0 + (int64_t)(opt_warmup * 1e9);
    t_end = t_meas + (int64_t)(opt_duration * 1e9);
    int64_t drain_deadline = 0, next_hk = t0, next_progress = t0 + NS_PER_S, last_progress = t0;
    uint64_t last_completed = 0;
    size_t ndown = 0;
    for (;;) {
        now = now_ns();
        if (sending && (now >= t_end || stop_requested)) {
            if (open_loop) advance_schedule(now < t_end ? now : t_end - 1);
            sending = 0;
            t_stop = now < t_end ? now : t_end;
            drain_deadline = now + timeout_ns;
            for (size_t i = 0; i < nconns; i++)
                if (conns[i].state == C_CONNECTING) conn_close(&conns[i]);
        }
        if (!sending && (inflight == 0 || now >= drain_deadline || stop_requested > 1)) break;
        if (now >= next_hk) {
            housekeeping(now, &ndown);
            next_hk = now + (ndown ? NS_PER_MS : 20 * NS_PER_MS);
        }
        if (opt_progress && now >= next_progress) {
            double dt = (double)(now - last_progress) / 1e9;
            fprintf(stderr,
                    "progress elapsed=%.1f sent=%" PRIu64 " completed=%" PRIu64 " rate=%.1f backlog=%" PRIu64
                    " errors=%" PRIu64 "\n",
                    (double)(now - t0) / 1e9, total_sent, total_completed,
                    dt > 0 ? (double)(total_completed - last_completed) / dt : 0.0, next_k - disp_k, total_errors);
            last_completed = total_completed;
            last_progress = now;
            while (next_progress <= now) next_progress += NS_PER_S;
        }
        dispatch(now);

        int64_t wake = next_hk;
        if (opt_progress && next_progress < wake) wake = next_progress;
        if (sending) {
            if (t_end < wake) wake = t_end;
            if (open_loop && idle_count > 0) {
                int64_t s = sched_time(next_k);
                if (s < wake) wake = s;
            }
        } else if (drain_deadline < wake) {
            wake = drain_deadline;
        }
        now = now_ns();
        int n = wait_events(evs, wake - now);
        if (n < 0 && errno != EINTR) {
            perror("openloop: epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            handle_event(&evs[i]);
            if (sending && idle_count > 0) dispatch(now_ns());
        }
    }
    if (sending) { /* only after an epoll failure */
        sending = 0;
        t_stop = now;
    }
    /* Whatever is still in flight timed out. */
    for (size_t i = 0; i < nconns; i++) {
        if (conns[i].state == C_BUSY) fail_request(&conns[i], E_TIMEOUT);
        conn_close(&conns[i]);
    }
    double duration_s = t_stop > t_meas ? (double)(t_stop - t_meas) / 1e9 : 0.0;
    if (stop_requested) fprintf(stderr, "openloop: interrupted\n");
    finish(out, duration_s, 0);
    return 0;
}
