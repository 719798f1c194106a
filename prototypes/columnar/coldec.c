/* coldec: THROWAWAY PROTOTYPE (not product code) of a compiled usage-tick decoder.
 *
 * decode(records, max_ts_ms=None) scans Kafka record values (a JSON array of usage-tick envelopes, or one
 * envelope) with a hand-written scanner for exactly that shape and returns the ticks as columns, with no
 * Python object per tick. A record it is not sure about (any backslash escape, an unknown key, a duplicate
 * key, a float, a negative or out-of-range integer, a timestamp outside the strict form, malformed JSON...)
 * is listed in `fallback` and contributes no ticks: the caller hands it to models.ticks.parse_record.
 *
 * dedup_new(ids, offsets, handle) hashes each id (MurmurHash3_x64_128) into an open-addressing set of
 * 128-bit hashes held by a PyCapsule (set_new) and returns a bytes mask: 1 = the id was new.
 *
 * Plain CPython C API, no third-party code. Build: ./build.sh
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The limits of models/ticks.py. */
#define MAX_ID_LENGTH 255
#define MAX_MEMORY_MB (16LL * 1024 * 1024)
#define MAX_INTERVAL_S 86400LL
#define MAX_CPUS 1000000LL
#define MAX_TS_MS 253402387200000LL

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ------------------------------------------------------------------ growable byte buffers */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static int buf_grow(buf_t *b, size_t extra) {
    size_t need = b->len + extra, cap = b->cap ? b->cap : 4096;
    while (cap < need) cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) return -1;
    b->p = np;
    b->cap = cap;
    return 0;
}

static inline int buf_put(buf_t *b, const void *src, size_t n) {
    if (UNLIKELY(b->len + n > b->cap) && buf_grow(b, n) < 0) return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static inline int buf_i64(buf_t *b, int64_t v) { return buf_put(b, &v, 8); }
static inline int buf_u32(buf_t *b, uint32_t v) { return buf_put(b, &v, 4); }

/* ------------------------------------------------------------------ the scanner */

enum { OK = 0, FALLBACK = 1, NOMEM = 2 };

typedef struct {
    const uint8_t *p; /* NULL: absent or null */
    Py_ssize_t n;     /* bytes */
    Py_ssize_t chars; /* code points */
} span_t;

typedef struct {
    const uint8_t *p, *end;
} cur_t;

static inline void skip_ws(cur_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

/* One UTF-8 sequence starting at p (first byte >= 0x80), as CPython/msgspec accept it (no overlongs, no
 * surrogates, <= U+10FFFF). Returns its length, 0 when invalid. */
static inline int utf8_seq(const uint8_t *p, const uint8_t *end) {
    uint8_t b0 = p[0];
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        if (end - p >= 2 && (p[1] & 0xC0) == 0x80) return 2;
        return 0;
    }
    if (b0 >= 0xE0 && b0 <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (b0 == 0xE0 && p[1] < 0xA0) return 0;  /* overlong */
        if (b0 == 0xED && p[1] >= 0xA0) return 0; /* surrogate */
        return 3;
    }
    if (b0 >= 0xF0 && b0 <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (b0 == 0xF0 && p[1] < 0x90) return 0; /* overlong */
        if (b0 == 0xF4 && p[1] >= 0x90) return 0; /* > U+10FFFF */
        return 4;
    }
    return 0;
}

/* A JSON string at c->p (which must be '"'): its raw bytes and code-point count. Any backslash (an escape),
 * raw control character or invalid UTF-8 -> FALLBACK. */
static inline int scan_str(cur_t *c, span_t *s) {
    const uint8_t *p = c->p, *end = c->end;
    if (UNLIKELY(p >= end || *p != '"')) return FALLBACK;
    p++;
    const uint8_t *start = p;
    Py_ssize_t multi = 0; /* bytes beyond the first of each multi-byte sequence */
    for (;;) {
        /* 8 bytes at a time while they are plain ASCII without '"', '\\' or a control character. */
        while (end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
            uint64_t q = w ^ (ones * '"'), bs = w ^ (ones * '\\');
            uint64_t special = ((q - ones) & ~q) | ((bs - ones) & ~bs) | (w - ones * 0x20) | w;
            if (special & high) break;
            p += 8;
        }
        if (UNLIKELY(p >= end)) return FALLBACK;
        uint8_t b = *p;
        if (b == '"') break;
        if (b == '\\' || b < 0x20) return FALLBACK;
        if (b < 0x80) {
            p++;
            continue;
        }
        int n = utf8_seq(p, end);
        if (!n) return FALLBACK;
        p += n;
        multi += n - 1;
    }
    s->p = start;
    s->n = p - start;
    s->chars = s->n - multi;
    c->p = p + 1;
    return OK;
}

static inline int scan_null(cur_t *c) {
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) {
        c->p += 4;
        return 1;
    }
    return 0;
}

/* A string or null. */
static inline int scan_opt_str(cur_t *c, span_t *s) {
    if (c->p < c->end && *c->p == 'n') {
        if (!scan_null(c)) return FALLBACK;
        s->p = NULL;
        s->n = s->chars = 0;
        return OK;
    }
    return scan_str(c, s);
}

/* A plain JSON integer (no fraction, no exponent) of at most 18 digits; a leading '-' only when allow_neg.
 * Sets *present = 0 for null. */
static inline int scan_int(cur_t *c, int allow_neg, int64_t *out, int *present) {
    const uint8_t *p = c->p, *end = c->end;
    if (p < end && *p == 'n') {
        if (!scan_null(c)) return FALLBACK;
        *present = 0;
        *out = 0;
        return OK;
    }
    int neg = 0;
    if (p < end && *p == '-') {
        if (!allow_neg) return FALLBACK;
        neg = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') return FALLBACK;
    int64_t v = 0;
    const uint8_t *d0 = p;
    if (*p == '0') {
        p++;
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            if (p - d0 >= 18) return FALLBACK; /* no overflow: at most 18 digits */
            v = v * 10 + (*p - '0');
            p++;
        }
    }
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E' || (*p >= '0' && *p <= '9'))) return FALLBACK;
    c->p = p;
    *out = neg ? -v : v;
    *present = 1;
    return OK;
}

/* ------------------------------------------------------------------ timestamps */

static inline int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
    /* Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date. */
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static inline int d2(const uint8_t *p, int *v) {
    if (p[0] < '0' || p[0] > '9' || p[1] < '0' || p[1] > '9') return 0;
    *v = (p[0] - '0') * 10 + (p[1] - '0');
    return 1;
}

/* YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|+HH:MM|-HH:MM) -> unix ms (floor), as parse_timestamp_ms reads it:
 * the local year within 1970..9999, a real calendar date, hour < 24, second < 60, |offset| < 24 h. */
static int parse_ts(const uint8_t *s, Py_ssize_t n, int64_t *out) {
    if (n < 20 || n > 32) return 0;
    int yh, yl, mo, d, h, mi, se;
    if (!d2(s, &yh) || !d2(s + 2, &yl) || s[4] != '-' || !d2(s + 5, &mo) || s[7] != '-' || !d2(s + 8, &d) ||
        s[10] != 'T' || !d2(s + 11, &h) || s[13] != ':' || !d2(s + 14, &mi) || s[16] != ':' || !d2(s + 17, &se))
        return 0;
    int y = yh * 100 + yl;
    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || se > 59) return 0;
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > dim[mo - 1] + (mo == 2 && leap)) return 0;
    Py_ssize_t i = 19;
    int64_t us = 0;
    if (s[i] == '.') {
        i++;
        int nd = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (++nd > 6) return 0;
            us = us * 10 + (s[i] - '0');
            i++;
        }
        if (nd == 0) return 0;
        for (int k = nd; k < 6; k++) us *= 10;
    }
    int64_t off = 0;
    if (i < n && s[i] == 'Z') {
        i++;
    } else if (i + 6 <= n && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        int oh, om;
        if (!d2(s + i + 1, &oh) || !d2(s + i + 4, &om) || oh > 23 || om > 59) return 0;
        off = (int64_t)oh * 3600 + om * 60;
        if (s[i] == '-') off = -off;
        i += 6;
    } else {
        return 0;
    }
    if (i != n) return 0;
    int64_t secs = days_from_civil(y, (unsigned)mo, (unsigned)d) * 86400 + h * 3600 + mi * 60 + se - off;
    *out = secs * 1000 + us / 1000; /* us >= 0: this is floor((secs * 10**6 + us) / 1000) */
    return 1;
}

/* ------------------------------------------------------------------ the org dictionary of one call */

typedef struct {
    uint64_t hash;
    uint32_t off, len; /* into names */
    uint32_t idx;      /* 0 = empty slot, else dictionary index + 1 */
} oslot_t;

typedef struct {
    oslot_t *slots;
    size_t mask, count;
    buf_t names;      /* the distinct names' bytes */
    buf_t names_off;  /* uint32 start of each, in dictionary order */
    buf_t names_len;  /* uint32 length of each */
} orgmap_t;

static inline uint64_t fnv1a(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h ^ (h >> 29);
}

static int orgmap_init(orgmap_t *m) {
    memset(m, 0, sizeof *m);
    m->mask = 1023;
    m->slots = calloc(m->mask + 1, sizeof(oslot_t));
    return m->slots ? 0 : -1;
}

static void orgmap_free(orgmap_t *m) {
    free(m->slots);
    free(m->names.p);
    free(m->names_off.p);
    free(m->names_len.p);
}

static int orgmap_grow(orgmap_t *m) {
    size_t ncap = (m->mask + 1) * 2;
    oslot_t *ns = calloc(ncap, sizeof(oslot_t));
    if (!ns) return -1;
    for (size_t i = 0; i <= m->mask; i++) {
        if (!m->slots[i].idx) continue;
        size_t j = m->slots[i].hash & (ncap - 1);
        while (ns[j].idx) j = (j + 1) & (ncap - 1);
        ns[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = ns;
    m->mask = ncap - 1;
    return 0;
}

/* The dictionary index of org name (p, n), adding it if new; -1 when out of memory. */
static inline int64_t orgmap_get(orgmap_t *m, const uint8_t *p, Py_ssize_t n) {
    uint64_t h = fnv1a(p, n);
    size_t j = h & m->mask;
    for (;;) {
        oslot_t *s = &m->slots[j];
        if (!s->idx) break;
        if (s->hash == h && s->len == (uint32_t)n && memcmp(m->names.p + s->off, p, n) == 0) return s->idx - 1;
        j = (j + 1) & m->mask;
    }
    uint32_t off = (uint32_t)m->names.len, idx = (uint32_t)m->count;
    if (buf_put(&m->names, p, n) < 0 || buf_u32(&m->names_off, off) < 0 || buf_u32(&m->names_len, (uint32_t)n) < 0)
        return -1;
    m->slots[j] = (oslot_t){h, off, (uint32_t)n, idx + 1};
    m->count++;
    if (m->count * 2 > m->mask + 1 && orgmap_grow(m) < 0) return -1;
    return idx;
}

/* ------------------------------------------------------------------ the columns of one call */

typedef struct {
    buf_t id, id_off, sb, sb_off, wk, wk_off, cl, cl_off;
    buf_t org, mem, cpu, itv, ts;
    buf_t rec_off, ignored;
    buf_t org_tmp; /* (const uint8_t *, Py_ssize_t) of the current record's ticks, resolved once it is good */
    int64_t n;      /* ticks */
} cols_t;

/* Lengths of every per-tick buffer, to roll a failed record back. */
typedef struct {
    size_t id, sb, wk, cl;
    int64_t n;
} mark_t;

static inline int put_str(buf_t *data, buf_t *offs, const uint8_t *p, Py_ssize_t n) {
    if (n && buf_put(data, p, n) < 0) return -1;
    return buf_i64(offs, (int64_t)data->len);
}

/* Envelope key bits. */
enum { K_ID = 1, K_ORG = 2, K_TS = 4, K_TYPE = 8, K_SB = 16, K_PLAN = 32, K_WK = 64, K_CL = 128, K_PAY = 256 };
enum { P_SB = 1, P_COST = 2, P_ITV = 4, P_MEM = 8, P_CPU = 16 };

static inline int key_is(const span_t *k, const char *lit, Py_ssize_t n) {
    return k->n == n && memcmp(k->p, lit, n) == 0;
}

typedef struct {
    span_t sb;
    int64_t itv, mem, cpu;
} payload_t;

static int scan_payload(cur_t *c, payload_t *pl) {
    memset(pl, 0, sizeof *pl);
    if (c->p < c->end && *c->p == 'n') return scan_null(c) ? OK : FALLBACK; /* payload: null */
    if (c->p >= c->end || *c->p != '{') return FALLBACK;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return OK;
    }
    unsigned seen = 0;
    for (;;) {
        span_t k;
        if (scan_str(c, &k) != OK) return FALLBACK;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':') return FALLBACK;
        c->p++;
        skip_ws(c);
        unsigned bit;
        int present, r;
        int64_t v;
        if (key_is(&k, "interval_s", 10)) {
            bit = P_ITV;
            r = scan_int(c, 0, &v, &present);
            if (r == OK && v > MAX_INTERVAL_S) r = FALLBACK;
            pl->itv = v;
        } else if (key_is(&k, "memory_mb", 9)) {
            bit = P_MEM;
            r = scan_int(c, 0, &v, &present);
            if (r == OK && v > MAX_MEMORY_MB) r = FALLBACK;
            pl->mem = v;
        } else if (key_is(&k, "cpu_count", 9)) {
            bit = P_CPU;
            r = scan_int(c, 0, &v, &present);
            if (r == OK && v > MAX_CPUS) r = FALLBACK;
            pl->cpu = v;
        } else if (key_is(&k, "sandbox_id", 10)) {
            bit = P_SB;
            r = scan_opt_str(c, &pl->sb);
            if (r == OK && pl->sb.chars > MAX_ID_LENGTH) r = FALLBACK;
        } else if (key_is(&k, "cost_cents", 10)) {
            bit = P_COST; /* not billed: only checked to be a plain int64 (18 digits here) or null */
            r = scan_int(c, 1, &v, &present);
        } else {
            return FALLBACK; /* unknown key */
        }
        if (r != OK || (seen & bit)) return FALLBACK; /* duplicate keys: the fallback decides */
        seen |= bit;
        skip_ws(c);
        if (c->p >= c->end) return FALLBACK;
        if (*c->p == ',') {
            c->p++;
            skip_ws(c);
            continue;
        }
        if (*c->p == '}') {
            c->p++;
            return OK;
        }
        return FALLBACK;
    }
}

/* One envelope at c->p, appended to the columns (or counted as ignored). */
static int scan_envelope(cur_t *c, cols_t *o, int64_t max_ts, int64_t *ignored) {
    if (c->p >= c->end || *c->p != '{') return FALLBACK;
    c->p++;
    skip_ws(c);
    span_t id = {0}, org = {0}, ts = {0}, typ = {0}, sb = {0}, plan = {0}, wk = {0}, cl = {0};
    payload_t pl;
    memset(&pl, 0, sizeof pl);
    unsigned seen = 0;
    if (c->p < c->end && *c->p == '}') return FALLBACK; /* {} lacks the required keys */
    for (;;) {
        span_t k;
        if (scan_str(c, &k) != OK) return FALLBACK;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':') return FALLBACK;
        c->p++;
        skip_ws(c);
        unsigned bit;
        int r;
        switch (k.n) {
        case 2:
            if (k.p[0] != 'i' || k.p[1] != 'd') return FALLBACK;
            bit = K_ID;
            r = scan_str(c, &id);
            break;
        case 4:
            if (key_is(&k, "type", 4)) {
                bit = K_TYPE;
                r = scan_str(c, &typ);
            } else if (key_is(&k, "plan", 4)) {
                bit = K_PLAN;
                r = scan_opt_str(c, &plan);
            } else
                return FALLBACK;
            break;
        case 6:
            if (!key_is(&k, "org_id", 6)) return FALLBACK;
            bit = K_ORG;
            r = scan_str(c, &org);
            break;
        case 7:
            if (key_is(&k, "cell_id", 7)) {
                bit = K_CL;
                r = scan_opt_str(c, &cl);
            } else if (key_is(&k, "payload", 7)) {
                bit = K_PAY;
                r = scan_payload(c, &pl);
            } else
                return FALLBACK;
            break;
        case 9:
            if (key_is(&k, "timestamp", 9)) {
                bit = K_TS;
                r = scan_str(c, &ts);
            } else if (key_is(&k, "worker_id", 9)) {
                bit = K_WK;
                r = scan_opt_str(c, &wk);
            } else
                return FALLBACK;
            break;
        case 10:
            if (!key_is(&k, "sandbox_id", 10)) return FALLBACK;
            bit = K_SB;
            r = scan_opt_str(c, &sb);
            break;
        default:
            return FALLBACK;
        }
        if (r != OK || (seen & bit)) return FALLBACK;
        seen |= bit;
        skip_ws(c);
        if (c->p >= c->end) return FALLBACK;
        if (*c->p == ',') {
            c->p++;
            skip_ws(c);
            continue;
        }
        if (*c->p == '}') {
            c->p++;
            break;
        }
        return FALLBACK;
    }
    /* What _FastEnvelope and _parse_fast check. */
    if ((seen & (K_ID | K_ORG | K_TS)) != (K_ID | K_ORG | K_TS)) return FALLBACK;
    if (id.chars < 1 || id.chars > MAX_ID_LENGTH || org.chars < 1 || org.chars > MAX_ID_LENGTH) return FALLBACK;
    if (sb.chars > MAX_ID_LENGTH || wk.chars > MAX_ID_LENGTH || cl.chars > MAX_ID_LENGTH) return FALLBACK;
    int64_t ms;
    if (!parse_ts(ts.p, ts.n, &ms) || ms > max_ts) return FALLBACK; /* every envelope's, an ignored one's too */
    if ((seen & K_TYPE) && !(typ.n == 10 && memcmp(typ.p, "usage_tick", 10) == 0)) {
        (*ignored)++;
        return OK;
    }
    /* sandbox = e.sandbox_id or p.sandbox_id or "" */
    const span_t *sandbox = (sb.p && sb.n) ? &sb : &pl.sb;
    const uint8_t *orgp = org.p;
    Py_ssize_t orgn = org.n;
    if (put_str(&o->id, &o->id_off, id.p, id.n) < 0 || put_str(&o->sb, &o->sb_off, sandbox->p, sandbox->n) < 0 ||
        put_str(&o->wk, &o->wk_off, wk.p, wk.n) < 0 || put_str(&o->cl, &o->cl_off, cl.p, cl.n) < 0 ||
        buf_put(&o->org_tmp, &orgp, sizeof orgp) < 0 || buf_put(&o->org_tmp, &orgn, sizeof orgn) < 0 ||
        buf_i64(&o->mem, pl.mem) < 0 || buf_i64(&o->cpu, pl.cpu) < 0 || buf_i64(&o->itv, pl.itv) < 0 ||
        buf_i64(&o->ts, ms) < 0)
        return NOMEM;
    o->n++;
    return OK;
}

static int scan_record(const uint8_t *data, Py_ssize_t len, cols_t *o, int64_t max_ts, int64_t *ignored) {
    cur_t c = {data, data + len};
    skip_ws(&c);
    if (c.p >= c.end) return FALLBACK;
    int r;
    if (*c.p == '[') {
        c.p++;
        skip_ws(&c);
        if (c.p < c.end && *c.p == ']') return FALLBACK; /* empty array: the validator rejects it */
        for (;;) {
            if ((r = scan_envelope(&c, o, max_ts, ignored)) != OK) return r;
            skip_ws(&c);
            if (c.p >= c.end) return FALLBACK;
            if (*c.p == ',') {
                c.p++;
                skip_ws(&c);
                continue;
            }
            if (*c.p == ']') {
                c.p++;
                break;
            }
            return FALLBACK;
        }
    } else if ((r = scan_envelope(&c, o, max_ts, ignored)) != OK) {
        return r;
    }
    skip_ws(&c);
    return c.p == c.end ? OK : FALLBACK;
}

/* ------------------------------------------------------------------ decode() */

static void cols_free(cols_t *o) {
    buf_t *all[] = {&o->id, &o->id_off, &o->sb,  &o->sb_off, &o->wk,      &o->wk_off,  &o->cl,     &o->cl_off, &o->org,
                    &o->mem, &o->cpu,   &o->itv, &o->ts,     &o->rec_off, &o->ignored, &o->org_tmp};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]->p);
}

static PyObject *bytes_of(buf_t *b) { return PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->len); }

static PyObject *coldec_decode(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"records", "max_ts_ms", NULL};
    PyObject *records, *max_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|O", kwlist, &PyList_Type, &records, &max_obj)) return NULL;
    int64_t max_ts = MAX_TS_MS;
    if (max_obj != Py_None) {
        long long v = PyLong_AsLongLong(max_obj);
        if (v == -1 && PyErr_Occurred()) return NULL;
        max_ts = v;
    }
    Py_ssize_t nrec = PyList_GET_SIZE(records);
    /* Hold every record (the GIL is released while scanning). */
    PyObject **held = PyMem_Malloc(sizeof(PyObject *) * (nrec ? nrec : 1));
    uint8_t *failed = PyMem_Calloc(nrec ? nrec : 1, 1);
    if (!held || !failed) {
        PyMem_Free(held);
        PyMem_Free(failed);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nrec; i++) {
        PyObject *r = PyList_GET_ITEM(records, i);
        if (!PyBytes_Check(r)) {
            for (Py_ssize_t j = 0; j < i; j++) Py_DECREF(held[j]);
            PyMem_Free(held);
            PyMem_Free(failed);
            return PyErr_Format(PyExc_TypeError, "records[%zd] is not bytes", i);
        }
        Py_INCREF(r);
        held[i] = r;
    }

    cols_t o;
    memset(&o, 0, sizeof o);
    orgmap_t om;
    int err = orgmap_init(&om) < 0 ? NOMEM : OK;
    Py_BEGIN_ALLOW_THREADS
    /* Offsets start at 0. */
    if (!err && (buf_i64(&o.id_off, 0) < 0 || buf_i64(&o.sb_off, 0) < 0 || buf_i64(&o.wk_off, 0) < 0 ||
                 buf_i64(&o.cl_off, 0) < 0 || buf_i64(&o.rec_off, 0) < 0))
        err = NOMEM;
    for (Py_ssize_t i = 0; i < nrec && !err; i++) {
        mark_t m = {o.id.len, o.sb.len, o.wk.len, o.cl.len, o.n};
        int64_t ign = 0;
        o.org_tmp.len = 0;
        int r = scan_record((const uint8_t *)PyBytes_AS_STRING(held[i]), PyBytes_GET_SIZE(held[i]), &o, max_ts, &ign);
        if (r == NOMEM) {
            err = NOMEM;
            break;
        }
        if (r == FALLBACK) { /* roll the record's ticks back */
            failed[i] = 1;
            o.id.len = m.id;
            o.sb.len = m.sb;
            o.wk.len = m.wk;
            o.cl.len = m.cl;
            size_t keep = (size_t)m.n;
            o.id_off.len = o.sb_off.len = o.wk_off.len = o.cl_off.len = (keep + 1) * 8;
            o.mem.len = o.cpu.len = o.itv.len = o.ts.len = keep * 8;
            o.n = m.n;
            ign = 0;
        } else { /* the record is good: its org ids into the dictionary */
            size_t cnt = o.org_tmp.len / (sizeof(const uint8_t *) + sizeof(Py_ssize_t));
            const char *t = o.org_tmp.p;
            for (size_t j = 0; j < cnt && !err; j++) {
                const uint8_t *p;
                Py_ssize_t n;
                memcpy(&p, t, sizeof p);
                memcpy(&n, t + sizeof p, sizeof n);
                t += sizeof p + sizeof n;
                int64_t idx = orgmap_get(&om, p, n);
                if (idx < 0 || buf_u32(&o.org, (uint32_t)idx) < 0) err = NOMEM;
            }
        }
        if (!err && (buf_i64(&o.rec_off, o.n) < 0 || buf_i64(&o.ignored, ign) < 0)) err = NOMEM;
    }
    Py_END_ALLOW_THREADS

    PyObject *result = NULL, *names = NULL, *fallback = NULL;
    if (err) {
        PyErr_NoMemory();
        goto done;
    }
    names = PyList_New((Py_ssize_t)om.count);
    fallback = PyList_New(0);
    if (!names || !fallback) goto done;
    for (size_t j = 0; j < om.count; j++) {
        uint32_t off = ((uint32_t *)om.names_off.p)[j], len = ((uint32_t *)om.names_len.p)[j];
        PyObject *s = PyUnicode_DecodeUTF8(om.names.p + off, len, "strict");
        if (!s) goto done;
        PyList_SET_ITEM(names, j, s);
    }
    for (Py_ssize_t i = 0; i < nrec; i++) {
        if (!failed[i]) continue;
        PyObject *ix = PyLong_FromSsize_t(i);
        if (!ix || PyList_Append(fallback, ix) < 0) {
            Py_XDECREF(ix);
            goto done;
        }
        Py_DECREF(ix);
    }
    /* (n, ids, ids_off, org_names, org, sandbox, sandbox_off, worker, worker_off, cell, cell_off,
     *  memory_mb, cpu_count, interval_s, ts_ms, rec_off, ignored, fallback) */
    result = Py_BuildValue("(LNNONNNNNNNNNNNNNO)", (long long)o.n, bytes_of(&o.id), bytes_of(&o.id_off), names,
                           bytes_of(&o.org), bytes_of(&o.sb), bytes_of(&o.sb_off), bytes_of(&o.wk), bytes_of(&o.wk_off),
                           bytes_of(&o.cl), bytes_of(&o.cl_off), bytes_of(&o.mem), bytes_of(&o.cpu), bytes_of(&o.itv),
                           bytes_of(&o.ts), bytes_of(&o.rec_off), bytes_of(&o.ignored), fallback);
done:
    Py_XDECREF(names);
    Py_XDECREF(fallback);
    for (Py_ssize_t i = 0; i < nrec; i++) Py_DECREF(held[i]);
    PyMem_Free(held);
    PyMem_Free(failed);
    cols_free(&o);
    orgmap_free(&om);
    return result;
}

/* ------------------------------------------------------------------ MurmurHash3_x64_128 */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static void murmur3_128(const uint8_t *data, size_t len, uint64_t seed, uint64_t out[2]) {
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    uint64_t h1 = seed, h2 = seed;
    size_t nblocks = len / 16;
    for (size_t i = 0; i < nblocks; i++) {
        uint64_t k1, k2;
        memcpy(&k1, data + i * 16, 8);
        memcpy(&k2, data + i * 16 + 8, 8);
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }
    const uint8_t *tail = data + nblocks * 16;
    uint64_t k1 = 0, k2 = 0;
    switch (len & 15) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; /* fall through */
    case 14: k2 ^= (uint64_t)tail[13] << 40; /* fall through */
    case 13: k2 ^= (uint64_t)tail[12] << 32; /* fall through */
    case 12: k2 ^= (uint64_t)tail[11] << 24; /* fall through */
    case 11: k2 ^= (uint64_t)tail[10] << 16; /* fall through */
    case 10: k2 ^= (uint64_t)tail[9] << 8;   /* fall through */
    case 9:
        k2 ^= (uint64_t)tail[8];
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        /* fall through */
    case 8: k1 ^= (uint64_t)tail[7] << 56; /* fall through */
    case 7: k1 ^= (uint64_t)tail[6] << 48; /* fall through */
    case 6: k1 ^= (uint64_t)tail[5] << 40; /* fall through */
    case 5: k1 ^= (uint64_t)tail[4] << 32; /* fall through */
    case 4: k1 ^= (uint64_t)tail[3] << 24; /* fall through */
    case 3: k1 ^= (uint64_t)tail[2] << 16; /* fall through */
    case 2: k1 ^= (uint64_t)tail[1] << 8;  /* fall through */
    case 1:
        k1 ^= (uint64_t)tail[0];
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    }
    h1 ^= len; h2 ^= len;
    h1 += h2; h2 += h1;
    h1 = fmix64(h1); h2 = fmix64(h2);
    h1 += h2; h2 += h1;
    out[0] = h1;
    out[1] = h2;
}

/* ------------------------------------------------------------------ the 128-bit hash set */

typedef struct {
    uint64_t *keys; /* 2 per slot; (0, 0) = empty */
    size_t mask, count;
} hset_t;

#define HSET_CAPSULE "coldec.hset"

static void hset_destroy(PyObject *cap) {
    hset_t *s = PyCapsule_GetPointer(cap, HSET_CAPSULE);
    if (s) {
        free(s->keys);
        free(s);
    }
}

static int hset_alloc(hset_t *s, size_t slots) {
    s->keys = calloc(slots * 2, sizeof(uint64_t));
    if (!s->keys) return -1;
    s->mask = slots - 1;
    return 0;
}

/* 1 if (h1, h2) was added, 0 if it was there; -1 when out of memory. Load factor <= 3/4. */
static inline int hset_add(hset_t *s, uint64_t h1, uint64_t h2) {
    size_t j = h1 & s->mask;
    for (;;) {
        uint64_t *k = s->keys + 2 * j;
        if (k[0] == h1 && k[1] == h2) return 0;
        if (!k[0] && !k[1]) {
            k[0] = h1;
            k[1] = h2;
            break;
        }
        j = (j + 1) & s->mask;
    }
    if (++s->count * 4 > (s->mask + 1) * 3) {
        hset_t n = {0};
        if (hset_alloc(&n, (s->mask + 1) * 2) < 0) return -1;
        for (size_t i = 0; i <= s->mask; i++) {
            uint64_t *k = s->keys + 2 * i;
            if (!k[0] && !k[1]) continue;
            size_t m = k[0] & n.mask;
            while (n.keys[2 * m] || n.keys[2 * m + 1]) m = (m + 1) & n.mask;
            n.keys[2 * m] = k[0];
            n.keys[2 * m + 1] = k[1];
        }
        free(s->keys);
        s->keys = n.keys;
        s->mask = n.mask;
    }
    return 1;
}

static PyObject *coldec_set_new(PyObject *self, PyObject *args) {
    Py_ssize_t hint = 0;
    if (!PyArg_ParseTuple(args, "|n", &hint)) return NULL;
    size_t slots = 1024;
    while (slots * 3 < (size_t)hint * 4 + 4) slots *= 2;
    hset_t *s = calloc(1, sizeof *s);
    if (!s || hset_alloc(s, slots) < 0) {
        free(s);
        return PyErr_NoMemory();
    }
    PyObject *cap = PyCapsule_New(s, HSET_CAPSULE, hset_destroy);
    if (!cap) {
        free(s->keys);
        free(s);
    }
    return cap;
}

static PyObject *coldec_set_len(PyObject *self, PyObject *cap) {
    hset_t *s = PyCapsule_GetPointer(cap, HSET_CAPSULE);
    return s ? PyLong_FromSize_t(s->count) : NULL;
}

#define SEED 0x9E3779B97F4A7C15ULL

static PyObject *coldec_dedup_new(PyObject *self, PyObject *args) {
    Py_buffer ids, offs;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "y*y*O", &ids, &offs, &cap)) return NULL;
    PyObject *mask = NULL;
    hset_t *s = PyCapsule_GetPointer(cap, HSET_CAPSULE);
    if (!s) goto done;
    if (offs.len % 8 || offs.len < 8) {
        PyErr_SetString(PyExc_ValueError, "offsets: n + 1 int64 values");
        goto done;
    }
    Py_ssize_t n = offs.len / 8 - 1;
    const int64_t *off = offs.buf;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (off[i] < 0 || off[i] > ids.len || (i && off[i] < off[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "offsets out of range");
            goto done;
        }
    }
    mask = PyBytes_FromStringAndSize(NULL, n);
    if (!mask) goto done;
    uint8_t *mp = (uint8_t *)PyBytes_AS_STRING(mask);
    const uint8_t *base = ids.buf;
    int oom = 0;
    /* The set is only touched with the GIL held (no locking of its own): keep it so. */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h[2];
        murmur3_128(base + off[i], (size_t)(off[i + 1] - off[i]), SEED, h);
        if (!h[0] && !h[1]) h[1] = 1;
        int r = hset_add(s, h[0], h[1]);
        if (r < 0) {
            oom = 1;
            break;
        }
        mp[i] = (uint8_t)r;
    }
    if (oom) {
        Py_CLEAR(mask);
        PyErr_NoMemory();
    }
done:
    PyBuffer_Release(&ids);
    PyBuffer_Release(&offs);
    return mask;
}

static PyObject *coldec_hash128(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    uint64_t h[2];
    murmur3_128(b.buf, (size_t)b.len, SEED, h);
    PyBuffer_Release(&b);
    return Py_BuildValue("(KK)", (unsigned long long)h[0], (unsigned long long)h[1]);
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))coldec_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(records: list[bytes], max_ts_ms=None) -> tuple of columns (see FIELDS)"},
    {"set_new", coldec_set_new, METH_VARARGS, "set_new(capacity_hint=0) -> capsule: a set of 128-bit id hashes"},
    {"set_len", coldec_set_len, METH_O, "set_len(handle) -> number of hashes held"},
    {"dedup_new", coldec_dedup_new, METH_VARARGS,
     "dedup_new(ids: buffer, offsets: int64 buffer (n+1), handle) -> bytes mask, 1 = new (added)"},
    {"hash128", coldec_hash128, METH_VARARGS, "hash128(data) -> (h1, h2), MurmurHash3_x64_128"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "coldec", "Throwaway columnar tick decoder prototype.", -1,
                                    methods};

PyMODINIT_FUNC PyInit_coldec(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *fields = Py_BuildValue("(ssssssssssssssssss)", "n", "ids", "ids_off", "org_names", "org", "sandbox",
                                     "sandbox_off", "worker", "worker_off", "cell", "cell_off", "memory_mb",
                                     "cpu_count", "interval_s", "ts_ms", "rec_off", "ignored", "fallback");
    if (!fields || PyModule_AddObject(m, "FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
