/*
 * c_headers: a Proxy-Wasm test plugin written in plain C against the raw ABI (0.2.1), built with
 * clang + wasi-libc as a WASI reactor (see build.sh). It exercises what a C or C++-SDK plugin
 * does: its own allocator handed to the host, per-root-context configuration, the serialized
 * header map in both directions, body buffering and replacement, and local replies.
 *
 * Configuration: a plain string (the route's `conf`), kept per root context (one per route).
 *
 * Per request:
 *   - `x-c-deny: yes`        -> local reply 418, header `x-c-reason: denied`, body "teapot\n";
 *   - request header         `x-c-conf: <conf>` (added);
 *   - request header         `x-c-header-count: <n>`, n = pairs in proxy_get_header_map_pairs
 *                            (map type 0) as the request came: pseudo-headers included, read
 *                            before this plugin adds anything;
 *   - `x-c-upper` present    -> the request body is held to its end, uppercased (ASCII) and
 *                            written back with proxy_set_buffer_bytes (replace);
 *   - response header        `x-c-plugin: <conf>` (replaced), then the whole response map is
 *                            read, re-serialized with `x-c-pairs: yes` appended and set back
 *                            with proxy_set_header_map_pairs (map type 2);
 *   - proxy_on_log           logs "<method> <path> -> <status>" at Info.
 *
 * Logged at Info as well: "VM started", "configured root context <id>: <conf>" and
 * "deleted root context <id>: <conf>" (a route changed or went away).
 *
 * Every buffer the host hands over (allocated through proxy_on_memory_allocate) is freed.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IMPORT(n) __attribute__((import_module("env"), import_name(#n)))
#define EXPORT(n) __attribute__((export_name(#n)))

typedef uint32_t status_t;

enum { ST_OK = 0, ST_NOT_FOUND = 1 };
enum { LOG_DEBUG = 1, LOG_INFO = 2, LOG_WARN = 3, LOG_ERROR = 4 };
enum { ACTION_CONTINUE = 0, ACTION_PAUSE = 1 };
enum { BUF_REQUEST_BODY = 0, BUF_PLUGIN_CONFIGURATION = 7 };
enum { MAP_REQUEST_HEADERS = 0, MAP_RESPONSE_HEADERS = 2 };

/* ---- host functions (module "env") ---------------------------------------------------- */

IMPORT(proxy_log)
status_t proxy_log(uint32_t level, const char *msg, size_t len);
IMPORT(proxy_get_buffer_bytes)
status_t proxy_get_buffer_bytes(uint32_t type, uint32_t start, uint32_t max, char **ptr,
                                size_t *len);
IMPORT(proxy_set_buffer_bytes)
status_t proxy_set_buffer_bytes(uint32_t type, uint32_t start, uint32_t size, const char *ptr,
                                size_t len);
IMPORT(proxy_get_header_map_pairs)
status_t proxy_get_header_map_pairs(uint32_t type, char **ptr, size_t *len);
IMPORT(proxy_set_header_map_pairs)
status_t proxy_set_header_map_pairs(uint32_t type, const char *ptr, size_t len);
IMPORT(proxy_get_header_map_value)
status_t proxy_get_header_map_value(uint32_t type, const char *key, size_t key_len, char **val,
                                    size_t *val_len);
IMPORT(proxy_add_header_map_value)
status_t proxy_add_header_map_value(uint32_t type, const char *key, size_t key_len,
                                    const char *val, size_t val_len);
IMPORT(proxy_replace_header_map_value)
status_t proxy_replace_header_map_value(uint32_t type, const char *key, size_t key_len,
                                        const char *val, size_t val_len);
IMPORT(proxy_send_local_response)
status_t proxy_send_local_response(uint32_t status, const char *details, size_t details_len,
                                   const char *body, size_t body_len, const char *headers,
                                   size_t headers_len, int32_t grpc_status);

/* ---- small helpers ---------------------------------------------------------------------- */

#define LIT(s) (s), (sizeof(s) - 1)

static void log_msg(uint32_t level, const char *msg, size_t len) { proxy_log(level, msg, len); }

/* A tiny string builder (malloc'd, grows by doubling). `ok` turns false on allocation failure. */
typedef struct {
  char *p;
  size_t len, cap;
  int ok;
} sbuf;

static void sb_reserve(sbuf *b, size_t more) {
  if (!b->ok || b->len + more <= b->cap) return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + more) cap *= 2;
  char *n = realloc(b->p, cap);
  if (!n) {
    b->ok = 0;
    return;
  }
  b->p = n;
  b->cap = cap;
}
static void sb_put(sbuf *b, const void *s, size_t n) {
  sb_reserve(b, n);
  if (!b->ok) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
}
static void sb_u32le(sbuf *b, uint32_t v) {
  unsigned char le[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >> 24) & 0xff};
  sb_put(b, le, 4);
}
static void sb_dec(sbuf *b, uint32_t v) {
  char tmp[10];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) sb_put(b, &tmp[--n], 1);
}
static sbuf sb_new(void) { return (sbuf){0, 0, 0, 1}; }

static uint32_t rd_u32le(const char *p) {
  const unsigned char *u = (const unsigned char *)p;
  return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

/* ---- the serialized header map --------------------------------------------------------- */
/* u32 N, N x (u32 key_len, u32 value_len), then each key NUL value NUL.                      */

typedef struct {
  const char *key, *val;
  uint32_t key_len, val_len;
} pair;

/* Decodes `buf` into a malloc'd array of pairs pointing into `buf`; returns the count, or -1
 * when the encoding is malformed. An empty buffer (the host's answer for an empty map) is 0. */
static int32_t map_decode(const char *buf, size_t len, pair **out) {
  *out = NULL;
  if (len == 0) return 0;
  if (len < 4) return -1;
  uint32_t n = rd_u32le(buf);
  if (n > (len - 4) / 8) return -1;
  size_t pos = 4 + (size_t)n * 8;
  pair *ps = n ? malloc(sizeof(pair) * n) : NULL;
  if (n && !ps) return -1;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t kl = rd_u32le(buf + 4 + 8 * i), vl = rd_u32le(buf + 8 + 8 * i);
    if (kl > len - pos || len - pos - kl < 1) goto bad;
    ps[i].key = buf + pos;
    ps[i].key_len = kl;
    pos += kl;
    if (buf[pos++] != '\0') goto bad;
    if (vl > len - pos || len - pos - vl < 1) goto bad;
    ps[i].val = buf + pos;
    ps[i].val_len = vl;
    pos += vl;
    if (buf[pos++] != '\0') goto bad;
  }
  if (pos != len) goto bad;
  *out = ps;
  return (int32_t)n;
bad:
  free(ps);
  return -1;
}

static void map_encode(sbuf *b, const pair *ps, uint32_t n) {
  sb_u32le(b, n);
  for (uint32_t i = 0; i < n; i++) {
    sb_u32le(b, ps[i].key_len);
    sb_u32le(b, ps[i].val_len);
  }
  for (uint32_t i = 0; i < n; i++) {
    sb_put(b, ps[i].key, ps[i].key_len);
    sb_put(b, "", 1);
    sb_put(b, ps[i].val, ps[i].val_len);
    sb_put(b, "", 1);
  }
}

/* ---- contexts ---------------------------------------------------------------------------- */

#define BUCKETS 64

typedef struct root_ctx {
  uint32_t id;
  char *conf; /* the host's buffer, owned since proxy_on_configure */
  size_t conf_len;
  struct root_ctx *next;
} root_ctx;

typedef struct http_ctx {
  uint32_t id, root;
  int upper;
  struct http_ctx *next;
} http_ctx;

static root_ctx *roots[BUCKETS];
static http_ctx *streams[BUCKETS];

static root_ctx *root_find(uint32_t id) {
  for (root_ctx *r = roots[id % BUCKETS]; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}
static http_ctx *http_find(uint32_t id) {
  for (http_ctx *h = streams[id % BUCKETS]; h; h = h->next)
    if (h->id == id) return h;
  return NULL;
}
/* The conf of the route an HTTP context belongs to ("" when unknown). */
static const char *conf_of(uint32_t http_id, size_t *len) {
  http_ctx *h = http_find(http_id);
  root_ctx *r = h ? root_find(h->root) : NULL;
  if (!r || !r->conf) {
    *len = 0;
    return "";
  }
  *len = r->conf_len;
  return r->conf;
}

/* ---- exports ------------------------------------------------------------------------------ */

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

/* The host allocates every buffer it hands us with this; we free them with free(). */
EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) {
  return malloc(size);
}

EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t id, uint32_t parent) {
  if (parent == 0) {
    root_ctx *r = calloc(1, sizeof *r);
    if (!r) return;
    r->id = id;
    r->next = roots[id % BUCKETS];
    roots[id % BUCKETS] = r;
  } else {
    http_ctx *h = calloc(1, sizeof *h);
    if (!h) return;
    h->id = id;
    h->root = parent;
    h->next = streams[id % BUCKETS];
    streams[id % BUCKETS] = h;
  }
}

EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t vm_conf_size) {
  (void)root_id;
  (void)vm_conf_size;
  log_msg(LOG_INFO, LIT("VM started"));
  return 1;
}

EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t size) {
  root_ctx *r = root_find(root_id);
  if (!r) return 0;
  char *conf = NULL;
  size_t len = 0;
  if (proxy_get_buffer_bytes(BUF_PLUGIN_CONFIGURATION, 0, size, &conf, &len) != ST_OK ||
      len == 0) {
    free(conf);
    log_msg(LOG_ERROR, LIT("an empty configuration"));
    return 0;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)conf[i];
    if (c == '\0' || c == '\r' || c == '\n') { /* it goes into header values */
      free(conf);
      log_msg(LOG_ERROR, LIT("the configuration has a control character"));
      return 0;
    }
  }
  free(r->conf);
  r->conf = conf;
  r->conf_len = len;
  sbuf m = sb_new();
  sb_put(&m, LIT("configured root context "));
  sb_dec(&m, root_id);
  sb_put(&m, LIT(": "));
  sb_put(&m, conf, len);
  if (m.ok) log_msg(LOG_INFO, m.p, m.len);
  free(m.p);
  return 1;
}

static int header_is(uint32_t map, const char *key, size_t key_len, const char *want,
                     size_t want_len, int *present) {
  char *v = NULL;
  size_t vl = 0;
  status_t st = proxy_get_header_map_value(map, key, key_len, &v, &vl);
  if (present) *present = st == ST_OK;
  int eq = st == ST_OK && want && vl == want_len && (vl == 0 || memcmp(v, want, vl) == 0);
  free(v);
  return eq;
}

EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)end_of_stream;
  if (header_is(MAP_REQUEST_HEADERS, LIT("x-c-deny"), LIT("yes"), NULL)) {
    sbuf h = sb_new();
    pair reason = {"x-c-reason", "denied", 10, 6};
    map_encode(&h, &reason, 1);
    if (h.ok)
      proxy_send_local_response(418, LIT("c_headers_denied"), LIT("teapot\n"), h.p, h.len, -1);
    free(h.p);
    return ACTION_PAUSE;
  }

  /* Every header the request has, as the client sent it (pseudo-headers included). */
  char *raw = NULL;
  size_t raw_len = 0;
  pair *ps = NULL;
  int32_t n = -1;
  if (proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &raw, &raw_len) == ST_OK)
    n = map_decode(raw, raw_len, &ps);
  sbuf v = sb_new();
  if (n < 0) {
    log_msg(LOG_ERROR, LIT("the request header map did not decode"));
    sb_put(&v, LIT("bad"));
  } else {
    sb_dec(&v, (uint32_t)n);
    if ((uint32_t)n != num_headers) {
      sbuf m = sb_new();
      sb_put(&m, LIT("proxy_on_request_headers: num_headers "));
      sb_dec(&m, num_headers);
      sb_put(&m, LIT(" but the header map has "));
      sb_dec(&m, (uint32_t)n);
      if (m.ok) log_msg(LOG_WARN, m.p, m.len);
      free(m.p);
    }
  }

  size_t conf_len;
  const char *conf = conf_of(id, &conf_len);
  proxy_add_header_map_value(MAP_REQUEST_HEADERS, LIT("x-c-conf"), conf, conf_len);
  if (v.ok) proxy_add_header_map_value(MAP_REQUEST_HEADERS, LIT("x-c-header-count"), v.p, v.len);
  free(v.p);
  free(ps);
  free(raw);

  int upper = 0;
  header_is(MAP_REQUEST_HEADERS, LIT("x-c-upper"), NULL, 0, &upper);
  http_ctx *h = http_find(id);
  if (h) h->upper = upper;
  return ACTION_CONTINUE;
}

EXPORT(proxy_on_request_body)
uint32_t proxy_on_request_body(uint32_t id, uint32_t body_size, uint32_t end_of_stream) {
  http_ctx *h = http_find(id);
  if (!h || !h->upper) return ACTION_CONTINUE;
  if (!end_of_stream) return ACTION_PAUSE; /* hold it all: body_size is cumulative */
  if (body_size == 0) return ACTION_CONTINUE;
  char *body = NULL;
  size_t len = 0;
  if (proxy_get_buffer_bytes(BUF_REQUEST_BODY, 0, body_size, &body, &len) != ST_OK) {
    log_msg(LOG_ERROR, LIT("could not read the request body"));
    return ACTION_CONTINUE;
  }
  for (size_t i = 0; i < len; i++)
    if (body[i] >= 'a' && body[i] <= 'z') body[i] = (char)(body[i] - 'a' + 'A');
  if (len && proxy_set_buffer_bytes(BUF_REQUEST_BODY, 0, body_size, body, len) != ST_OK)
    log_msg(LOG_ERROR, LIT("could not replace the request body"));
  free(body);
  return ACTION_CONTINUE;
}

EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  (void)end_of_stream;
  size_t conf_len;
  const char *conf = conf_of(id, &conf_len);
  proxy_replace_header_map_value(MAP_RESPONSE_HEADERS, LIT("x-c-plugin"), conf, conf_len);

  char *raw = NULL;
  size_t raw_len = 0;
  pair *ps = NULL;
  int32_t n = -1;
  if (proxy_get_header_map_pairs(MAP_RESPONSE_HEADERS, &raw, &raw_len) == ST_OK)
    n = map_decode(raw, raw_len, &ps);
  if (n < 0) {
    log_msg(LOG_ERROR, LIT("the response header map did not decode"));
  } else {
    pair *all = realloc(ps, sizeof(pair) * ((size_t)n + 1));
    if (all) {
      ps = all;
      ps[n] = (pair){"x-c-pairs", "yes", 9, 3};
      sbuf b = sb_new();
      map_encode(&b, ps, (uint32_t)n + 1);
      if (b.ok && proxy_set_header_map_pairs(MAP_RESPONSE_HEADERS, b.p, b.len) != ST_OK)
        log_msg(LOG_ERROR, LIT("proxy_set_header_map_pairs refused the map"));
      free(b.p);
    }
  }
  free(ps);
  free(raw);
  return ACTION_CONTINUE;
}

EXPORT(proxy_on_log) void proxy_on_log(uint32_t id) {
  (void)id;
  char *method = NULL, *path = NULL, *status = NULL;
  size_t ml = 0, pl = 0, sl = 0;
  proxy_get_header_map_value(MAP_REQUEST_HEADERS, LIT(":method"), &method, &ml);
  proxy_get_header_map_value(MAP_REQUEST_HEADERS, LIT(":path"), &path, &pl);
  proxy_get_header_map_value(MAP_RESPONSE_HEADERS, LIT(":status"), &status, &sl);
  sbuf m = sb_new();
  sb_put(&m, method ? method : "-", method ? ml : 1);
  sb_put(&m, " ", 1);
  sb_put(&m, path ? path : "-", path ? pl : 1);
  sb_put(&m, LIT(" -> "));
  sb_put(&m, status ? status : "-", status ? sl : 1);
  if (m.ok) log_msg(LOG_INFO, m.p, m.len);
  free(m.p);
  free(method);
  free(path);
  free(status);
}

EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t id) {
  (void)id;
  return 1;
}

EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t id) {
  for (http_ctx **p = &streams[id % BUCKETS]; *p; p = &(*p)->next)
    if ((*p)->id == id) {
      http_ctx *h = *p;
      *p = h->next;
      free(h);
      return;
    }
  for (root_ctx **p = &roots[id % BUCKETS]; *p; p = &(*p)->next)
    if ((*p)->id == id) {
      root_ctx *r = *p;
      *p = r->next;
      sbuf m = sb_new();
      sb_put(&m, LIT("deleted root context "));
      sb_dec(&m, id);
      sb_put(&m, LIT(": "));
      sb_put(&m, r->conf ? r->conf : "-", r->conf ? r->conf_len : 1);
      if (m.ok) log_msg(LOG_INFO, m.p, m.len);
      free(m.p);
      free(r->conf);
      free(r);
      return;
    }
}
