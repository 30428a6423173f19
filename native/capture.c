/*
 * lcprobe._capture: llama.cpp eval callback that copies selected rows of
 * named graph tensors (l_out-N, ffn_inp-N, ...) into a buffer it owns.
 *
 * Rules this file keeps (see STYLE.md, "Lessons"):
 *  - the callback never calls into Python, never exits, never aborts; every
 *    surprise (unknown shape, wrong row count, unsupported type) is written to
 *    the state's error slot and the tensor is skipped; Python reads the slot
 *    after llama_decode and raises;
 *  - it only touches tensor memory through ggml_backend_tensor_get/_set, so
 *    CPU, CUDA and Metal buffers work the same;
 *  - it returns true from the collect call, so the scheduler runs the rest of
 *    the graph split, except on the one node Python names as the stop (the
 *    last block's output when llama.cpp's logits are not wanted): there false
 *    deliberately ends the split, cutting the head off the graph.
 *
 * Row bookkeeping. Python declares, per llama_decode, which batch tokens are
 * outputs (logits requested); exactly those rows are captured, output j going
 * to destination row j. llama.cpp splits a batch into ubatches of n_ubatch
 * consecutive tokens (split_simple, which it uses with a unified KV cache) and
 * runs the whole graph once per ubatch, so the k-th time a site fires belongs
 * to ubatch k. Most layer tensors hold one row per ubatch token; the last
 * layer keeps only the ubatch's output rows (inp_out_ids). The row count tells
 * which case applies; when both counts agree every token is an output and the
 * two mappings coincide.
 *
 * Interventions run in the same collect call, in this order: edits (x += v or
 * x = v on chosen rows, lcp_edit), then the capture (so it sees the edited
 * values), then patches (dst := src saved earlier in the ubatch).
 *
 * Thread contract. The callback runs on the thread inside llama_decode, which
 * llama-cpp-python calls with the GIL released, so another Python thread may
 * call into this module meanwhile. begin() arms the state and end() disarms
 * it; while armed, every function that changes or reads what the callback
 * uses (set_sites, set_patches, set_edits, begin, read, trace) raises
 * RuntimeError instead of racing with it. end() only clears the flag and
 * reads counters, so it is safe at any time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml_abi.h"

#define LCP_NAME_MAX 64
#define LCP_MAX_PATCHES 16
#define LCP_MAX_EDITS 64
#define LCP_TRACE_MAX (1u << 22)
#define LCP_CAPSULE "lcprobe._capture.State"

typedef struct {
    char name[LCP_NAME_MAX];
    int64_t width;  /* expected ne[0] */
    int32_t seen;   /* times it fired in the current decode */
    int64_t copied; /* rows copied in the current decode */
    size_t off;     /* float offset of this site's block in rows */
} lcp_site;

/* Intervention: after `dst` is computed, overwrite it with `src`'s value
 * saved earlier in the same ubatch (e.g. l_out-5 := l_out-4 skips layer 6). */
typedef struct {
    char src[LCP_NAME_MAX];
    char dst[LCP_NAME_MAX];
    uint8_t *saved;
    size_t saved_cap;
    size_t saved_bytes;
    int64_t saved_rows;
    int32_t src_seen;
    int32_t applied;
} lcp_patch;

/* Intervention on one node's output, per batch token: rows[i] >= 0 adds
 * (or writes) values[rows[i]] to the row of batch token i; -1 leaves it. */
enum { LCP_EDIT_ADD = 0, LCP_EDIT_SET = 1 };
typedef struct {
    char name[LCP_NAME_MAX];
    int mode;
    int64_t width;
    int64_t n_values;
    float *values;  /* [n_values][width] */
    int64_t n_rows; /* batch tokens the plan is for */
    int32_t *rows;  /* [n_rows] */
    int32_t fired;  /* times applied (once per ubatch) in the current decode */
    int64_t written; /* rows changed in the current decode */
} lcp_edit;

typedef struct {
    struct lcp_ggml_api api;

    int n_sites;
    lcp_site *sites;
    int n_patches;
    lcp_patch patches[LCP_MAX_PATCHES];
    int n_edits;
    lcp_edit *edits;

    /* per-decode plan */
    int active;
    int64_t n_tokens;
    int64_t n_ubatch;
    int64_t n_outputs;
    int32_t *tok_dest;   /* [n_tokens] output ordinal or -1 */
    int64_t *out_before; /* [n_tokens + 1] outputs before token i */
    int64_t *out_tok;    /* [n_outputs] batch index of output j */
    size_t plan_cap;     /* capacity of tok_dest/out_before in tokens */

    float *rows; /* captured rows of all sites */
    size_t rows_len;
    size_t rows_cap;

    uint8_t *stage; /* staging for one tensor span */
    size_t stage_cap;

    int64_t n_calls;

    /* Node after which the rest of the graph is skipped (the last block's
     * output when the caller does not want llama.cpp's logits): returning
     * false from the callback makes the scheduler stop the split there, so
     * the output norm and head, the largest matmul of a small model, are not
     * computed for rows the lens recomputes anyway. Empty: run everything. */
    char stop[LCP_NAME_MAX];
    int64_t n_stopped;

    /* optional trace of every node name the scheduler offers (lcprobe sites) */
    int tracing;
    char *trace;
    size_t trace_len;
    size_t trace_cap;
    int64_t trace_dropped; /* names that did not fit under LCP_TRACE_MAX */

    int has_err;
    char err[512];
} lcp_state;

static void lcp_fail(lcp_state *s, const char *fmt, ...) {
    if (s->has_err) {
        return; /* keep the first error: later ones are usually consequences */
    }
    s->has_err = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof(s->err), fmt, ap);
    va_end(ap);
}

static int lcp_grow(void **p, size_t *cap, size_t need) {
    if (need <= *cap) {
        return 1;
    }
    size_t n = *cap ? *cap : 4096;
    while (n < need) {
        n *= 2;
    }
    void *q = realloc(*p, n);
    if (!q) {
        return 0;
    }
    *p = q;
    *cap = n;
    return 1;
}

static int lcp_find_site(const lcp_state *s, const char *name) {
    for (int i = 0; i < s->n_sites; i++) {
        if (strcmp(s->sites[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

static size_t lcp_type_size(int32_t type) {
    switch (type) {
    case LCP_GGML_TYPE_F32: return 4;
    case LCP_GGML_TYPE_F16: return 2;
    case LCP_GGML_TYPE_BF16: return 2;
    default: return 0;
    }
}

/* Shape checks shared by capture and patches: a 2-D (or flat 3/4-D with
 * unit dims) float tensor whose rows are contiguous, and whose byte size
 * agrees with ggml's own count (guards the mirrored struct layout). */
static int lcp_check_tensor(lcp_state *s, const struct lcp_ggml_tensor *t, const char *name,
                            int64_t *n_rows) {
    size_t ts = lcp_type_size(t->type);
    if (ts == 0) {
        lcp_fail(s, "tensor %s has ggml type %d; only F32, F16 and BF16 can be captured", name,
                 (int)t->type);
        return 0;
    }
    if (t->buffer == NULL) {
        lcp_fail(s, "tensor %s has no backend buffer", name);
        return 0;
    }
    if (t->ne[2] != 1 || t->ne[3] != 1) {
        lcp_fail(s, "tensor %s has shape [%lld, %lld, %lld, %lld]; expected [width, rows, 1, 1]",
                 name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
                 (long long)t->ne[3]);
        return 0;
    }
    if (t->nb[0] != ts || t->nb[1] < ts * (size_t)t->ne[0]) {
        lcp_fail(s, "tensor %s is not row-contiguous (nb0=%zu nb1=%zu)", name, t->nb[0], t->nb[1]);
        return 0;
    }
    size_t expect = t->ne[1] > 0 ? (size_t)(t->ne[1] - 1) * t->nb[1] + ts * (size_t)t->ne[0] : 0;
    size_t have = s->api.nbytes(t);
    if (have < expect) {
        lcp_fail(s,
                 "tensor %s: ggml reports %zu bytes but its shape needs %zu; the ggml_tensor "
                 "layout does not match this build of lcprobe",
                 name, have, expect);
        return 0;
    }
    *n_rows = t->ne[1];
    return 1;
}

/* Which token range of the batch the k-th firing of a site belongs to. */
static int lcp_ubatch(lcp_state *s, int32_t k, const char *name, int64_t *tok0, int64_t *n_tok,
                      int64_t *n_out) {
    int64_t start = (int64_t)k * s->n_ubatch;
    if (start >= s->n_tokens) {
        lcp_fail(s, "tensor %s fired %d times, more than the %lld ubatches of this batch", name,
                 (int)k + 1, (long long)((s->n_tokens + s->n_ubatch - 1) / s->n_ubatch));
        return 0;
    }
    int64_t end = start + s->n_ubatch < s->n_tokens ? start + s->n_ubatch : s->n_tokens;
    *tok0 = start;
    *n_tok = end - start;
    *n_out = s->out_before[end] - s->out_before[start];
    return 1;
}

/* Destination row (output ordinal) of tensor row r, or -1 when not wanted;
 * -2 when the row count fits neither layout. */
static int64_t lcp_dest(const lcp_state *s, int64_t rows, int64_t r, int64_t tok0, int64_t n_tok,
                        int64_t n_out) {
    if (rows == n_tok) {
        return s->tok_dest[tok0 + r];
    }
    if (rows == n_out) {
        return s->out_before[tok0] + r;
    }
    return -2;
}

/* Bytes from the start of row r0 to the end of row r1 - 1. Rows may be
 * padded (nb1 > row bytes), and the last row's padding need not exist: a
 * read of (r1 - r0) * nb1 bytes would run past ggml_nbytes and ggml asserts. */
static size_t lcp_span_bytes(const struct lcp_ggml_tensor *t, int64_t r0, int64_t r1) {
    size_t row = lcp_type_size(t->type) * (size_t)t->ne[0];
    return r1 > r0 ? (size_t)(r1 - r0 - 1) * t->nb[1] + row : 0;
}

static void lcp_read_span(lcp_state *s, const struct lcp_ggml_tensor *t, int64_t r0, int64_t r1,
                          uint8_t **data) {
    size_t len = lcp_span_bytes(t, r0, r1);
    *data = NULL;
    if (!lcp_grow((void **)&s->stage, &s->stage_cap, len)) {
        lcp_fail(s, "out of memory staging %zu bytes", len);
        return;
    }
    s->api.tensor_get(t, s->stage, (size_t)r0 * t->nb[1], len);
    *data = s->stage;
}

static void lcp_to_f32(lcp_state *s, int32_t type, const uint8_t *src, float *dst, int64_t n) {
    switch (type) {
    case LCP_GGML_TYPE_F32: memcpy(dst, src, (size_t)n * 4); break;
    case LCP_GGML_TYPE_F16: s->api.fp16_to_fp32_row((const uint16_t *)src, dst, n); break;
    case LCP_GGML_TYPE_BF16: s->api.bf16_to_fp32_row((const uint16_t *)src, dst, n); break;
    }
}

static void lcp_capture(lcp_state *s, int idx, const struct lcp_ggml_tensor *t, const char *name) {
    lcp_site *site = &s->sites[idx];
    int32_t k = site->seen++;
    int64_t rows;
    if (!lcp_check_tensor(s, t, name, &rows)) {
        return;
    }
    if (t->ne[0] != site->width) {
        lcp_fail(s, "tensor %s has width %lld, expected %lld", name, (long long)t->ne[0],
                 (long long)site->width);
        return;
    }
    int64_t tok0, n_tok, n_out;
    if (!lcp_ubatch(s, k, name, &tok0, &n_tok, &n_out)) {
        return;
    }
    if (rows != n_tok && rows != n_out) {
        lcp_fail(s, "tensor %s has %lld rows in ubatch %d; expected %lld (tokens) or %lld (outputs)",
                 name, (long long)rows, (int)k, (long long)n_tok, (long long)n_out);
        return;
    }
    /* One transfer for the span of wanted rows: a single device sync on GPU. */
    int64_t r0 = -1, r1 = -1;
    for (int64_t r = 0; r < rows; r++) {
        if (lcp_dest(s, rows, r, tok0, n_tok, n_out) >= 0) {
            if (r0 < 0) {
                r0 = r;
            }
            r1 = r + 1;
        }
    }
    if (r0 < 0) {
        return;
    }
    uint8_t *data;
    lcp_read_span(s, t, r0, r1, &data);
    if (!data) {
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        int64_t d = lcp_dest(s, rows, r, tok0, n_tok, n_out);
        if (d < 0) {
            continue;
        }
        if (d >= s->n_outputs) {
            lcp_fail(s, "tensor %s row %lld maps to output %lld of %lld", name, (long long)r,
                     (long long)d, (long long)s->n_outputs);
            return;
        }
        float *dst = s->rows + site->off + (size_t)d * (size_t)site->width;
        lcp_to_f32(s, t->type, data + (size_t)(r - r0) * t->nb[1], dst, site->width);
        site->copied++;
    }
}

static void lcp_patch_save(lcp_state *s, lcp_patch *p, const struct lcp_ggml_tensor *t,
                           const char *name) {
    int64_t rows;
    p->src_seen++;
    if (!lcp_check_tensor(s, t, name, &rows)) {
        return;
    }
    size_t len = lcp_span_bytes(t, 0, rows);
    if (!lcp_grow((void **)&p->saved, &p->saved_cap, len)) {
        lcp_fail(s, "out of memory saving %s", name);
        return;
    }
    s->api.tensor_get(t, p->saved, 0, len);
    p->saved_bytes = len;
    p->saved_rows = rows;
}

static void lcp_patch_apply(lcp_state *s, lcp_patch *p, struct lcp_ggml_tensor *t, const char *name) {
    int64_t rows;
    int32_t k = p->applied++;
    if (p->src_seen != p->applied) {
        lcp_fail(s, "patch %s := %s: the source was not computed before the target in ubatch %d",
                 name, p->src, (int)k);
        return;
    }
    if (!lcp_check_tensor(s, t, name, &rows)) {
        return;
    }
    size_t stride = t->nb[1];
    size_t row_bytes = lcp_type_size(t->type) * (size_t)t->ne[0];
    if (rows == p->saved_rows && lcp_span_bytes(t, 0, rows) == p->saved_bytes) {
        s->api.tensor_set(t, p->saved, 0, p->saved_bytes);
        return;
    }
    /* The target is the last layer, trimmed to the output rows, while the
     * source still holds every token: copy the output rows only. */
    int64_t tok0, n_tok, n_out;
    if (!lcp_ubatch(s, k, name, &tok0, &n_tok, &n_out)) {
        return;
    }
    if (rows != n_out || p->saved_rows != n_tok || p->saved_bytes != lcp_span_bytes(t, 0, n_tok)) {
        lcp_fail(s, "patch %s := %s: %lld rows cannot take %lld rows", name, p->src,
                 (long long)rows, (long long)p->saved_rows);
        return;
    }
    for (int64_t j = 0; j < n_out; j++) {
        int64_t tok = s->out_tok[s->out_before[tok0] + j] - tok0;
        s->api.tensor_set(t, p->saved + (size_t)tok * stride, (size_t)j * stride, row_bytes);
    }
}

/* Batch token of tensor row r in a ubatch: every token, or (the last layer,
 * trimmed to inp_out_ids) only the ubatch's outputs in batch order. */
static int64_t lcp_row_token(const lcp_state *s, int64_t rows, int64_t r, int64_t tok0, int64_t n_tok) {
    return rows == n_tok ? tok0 + r : s->out_tok[s->out_before[tok0] + r];
}

static void lcp_edit_apply(lcp_state *s, lcp_edit *e, struct lcp_ggml_tensor *t, const char *name) {
    int32_t k = e->fired++;
    int64_t rows;
    if (!lcp_check_tensor(s, t, name, &rows)) {
        return;
    }
    if (t->type != LCP_GGML_TYPE_F32) {
        lcp_fail(s, "edit on %s: the tensor has ggml type %d; only F32 tensors can be edited", name,
                 (int)t->type);
        return;
    }
    if (t->ne[0] != e->width) {
        lcp_fail(s, "edit on %s: the tensor has width %lld, the edit's values %lld", name,
                 (long long)t->ne[0], (long long)e->width);
        return;
    }
    if (e->n_rows != s->n_tokens) {
        lcp_fail(s, "edit on %s has %lld rows for a batch of %lld tokens", name, (long long)e->n_rows,
                 (long long)s->n_tokens);
        return;
    }
    int64_t tok0, n_tok, n_out;
    if (!lcp_ubatch(s, k, name, &tok0, &n_tok, &n_out)) {
        return;
    }
    if (rows != n_tok && rows != n_out) {
        lcp_fail(s, "edit on %s: %lld rows in ubatch %d; expected %lld (tokens) or %lld (outputs)", name,
                 (long long)rows, (int)k, (long long)n_tok, (long long)n_out);
        return;
    }
    size_t stride = t->nb[1];
    size_t row_bytes = (size_t)e->width * sizeof(float);
    /* One get/set per run of consecutive edited rows: rows left alone are
     * never transferred, and a run costs one device sync on GPU. */
    for (int64_t r = 0; r < rows;) {
        if (e->rows[lcp_row_token(s, rows, r, tok0, n_tok)] < 0) {
            r++;
            continue;
        }
        int64_t r1 = r + 1;
        while (r1 < rows && e->rows[lcp_row_token(s, rows, r1, tok0, n_tok)] >= 0) {
            r1++;
        }
        size_t len = lcp_span_bytes(t, r, r1);
        if (!lcp_grow((void **)&s->stage, &s->stage_cap, len)) {
            lcp_fail(s, "out of memory staging %zu bytes", len);
            return;
        }
        /* set needs no read unless padding between rows must be preserved */
        if (e->mode == LCP_EDIT_ADD || (stride != row_bytes && r1 - r > 1)) {
            s->api.tensor_get(t, s->stage, (size_t)r * stride, len);
        }
        for (int64_t j = r; j < r1; j++) {
            float *x = (float *)(s->stage + (size_t)(j - r) * stride);
            const float *v = e->values + (size_t)e->rows[lcp_row_token(s, rows, j, tok0, n_tok)] * (size_t)e->width;
            if (e->mode == LCP_EDIT_ADD) {
                for (int64_t c = 0; c < e->width; c++) {
                    x[c] += v[c];
                }
            } else {
                memcpy(x, v, row_bytes);
            }
        }
        s->api.tensor_set(t, s->stage, (size_t)r * stride, len);
        e->written += r1 - r;
        r = r1;
    }
}

/* bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor *t, bool ask, void *user_data) */
static bool lcp_cb_eval(struct lcp_ggml_tensor *t, bool ask, void *user_data) {
    lcp_state *s = (lcp_state *)user_data;
    if (s == NULL || !s->active || t == NULL) {
        return ask ? false : true;
    }
    s->n_calls++;
    const char *name = s->api.get_name(t);
    if (name == NULL) {
        return ask ? false : true;
    }
    if (ask && s->tracing) {
        size_t len = strlen(name) + 1;
        if (s->trace_len + len <= LCP_TRACE_MAX && lcp_grow((void **)&s->trace, &s->trace_cap, s->trace_len + len)) {
            memcpy(s->trace + s->trace_len, name, len);
            s->trace_len += len;
        } else {
            s->trace_dropped++;
        }
    }
    int idx = lcp_find_site(s, name);
    int wanted = idx >= 0;
    for (int i = 0; i < s->n_patches && !wanted; i++) {
        wanted = strcmp(s->patches[i].src, name) == 0 || strcmp(s->patches[i].dst, name) == 0;
    }
    for (int i = 0; i < s->n_edits && !wanted; i++) {
        wanted = strcmp(s->edits[i].name, name) == 0;
    }
    /* never while tracing: `lcprobe sites` must see every node */
    int stop = s->stop[0] != '\0' && !s->tracing && strcmp(s->stop, name) == 0;
    if (ask) {
        return wanted || stop;
    }
    if (!wanted) {
        if (stop) {
            s->n_stopped++;
            return false;
        }
        return true;
    }
    /* Edits first, so that the capture and everything downstream see them;
     * then capture; then patches: a captured site that is also a patch
     * target reports what the layer computed, before the patch. */
    for (int i = 0; i < s->n_edits; i++) {
        if (strcmp(s->edits[i].name, name) == 0) {
            lcp_edit_apply(s, &s->edits[i], t, name);
        }
    }
    if (idx >= 0) {
        lcp_capture(s, idx, t, name);
    }
    for (int i = 0; i < s->n_patches; i++) {
        lcp_patch *p = &s->patches[i];
        if (strcmp(p->src, name) == 0) {
            lcp_patch_save(s, p, t, name);
        }
        if (strcmp(p->dst, name) == 0) {
            lcp_patch_apply(s, p, t, name);
        }
    }
    if (stop) {
        s->n_stopped++;
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* Python interface: a capsule owning the state, plus plain functions.       */

static void lcp_free_edits(lcp_edit *edits, int n) {
    for (int i = 0; i < n; i++) {
        free(edits[i].values);
        free(edits[i].rows);
    }
    free(edits);
}

static void lcp_free(lcp_state *s) {
    if (!s) {
        return;
    }
    lcp_free_edits(s->edits, s->n_edits);
    free(s->sites);
    free(s->tok_dest);
    free(s->out_before);
    free(s->out_tok);
    free(s->rows);
    free(s->stage);
    free(s->trace);
    for (int i = 0; i < LCP_MAX_PATCHES; i++) {
        free(s->patches[i].saved);
    }
    free(s);
}

static void lcp_capsule_destructor(PyObject *cap) {
    lcp_free((lcp_state *)PyCapsule_GetPointer(cap, LCP_CAPSULE));
}

static lcp_state *lcp_get(PyObject *cap) {
    return (lcp_state *)PyCapsule_GetPointer(cap, LCP_CAPSULE);
}

/* The thread contract (top of file): nothing the callback reads changes
 * while a decode is armed. */
static int lcp_idle(const lcp_state *s, const char *what) {
    if (s->active) {
        PyErr_Format(PyExc_RuntimeError, "%s: not allowed while a llama_decode is in progress", what);
        return 0;
    }
    return 1;
}

static int lcp_name_ok(const char *name, Py_ssize_t len) {
    if (len <= 0 || len >= LCP_NAME_MAX) {
        PyErr_Format(PyExc_ValueError, "tensor name must have 1 to %d characters", LCP_NAME_MAX - 1);
        return 0;
    }
    return 1;
}

/* Which ggml function goes where: bound by name, so the Python side cannot
 * hand them over in the wrong order. */
static const struct {
    const char *name;
    size_t offset;
} lcp_api_names[] = {
    {"ggml_get_name", offsetof(struct lcp_ggml_api, get_name)},
    {"ggml_nbytes", offsetof(struct lcp_ggml_api, nbytes)},
    {"ggml_backend_tensor_get", offsetof(struct lcp_ggml_api, tensor_get)},
    {"ggml_backend_tensor_set", offsetof(struct lcp_ggml_api, tensor_set)},
    {"ggml_fp16_to_fp32_row", offsetof(struct lcp_ggml_api, fp16_to_fp32_row)},
    {"ggml_bf16_to_fp32_row", offsetof(struct lcp_ggml_api, bf16_to_fp32_row)},
};

/* Address of the ggml function `name` in the dict, or NULL with an exception set. */
void *lcp_address(PyObject *dict, const char *name) {
    PyObject *v = PyDict_GetItemString(dict, name); /* borrowed */
    if (v == NULL) {
        PyErr_Format(PyExc_ValueError, "the address of %s is missing", name);
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(v);
    if (p == NULL && !PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "the address of %s is NULL", name);
    }
    return p;
}

PyDoc_STRVAR(new_doc, "new(addresses: dict[str, int]) -> state\n\n"
                      "Create a capture state from the addresses of ggml's exported functions, keyed by "
                      "name: ggml_get_name, ggml_nbytes, ggml_backend_tensor_get, ggml_backend_tensor_set, "
                      "ggml_fp16_to_fp32_row, ggml_bf16_to_fp32_row.");
static PyObject *py_new(PyObject *self, PyObject *addrs) {
    if (!PyDict_Check(addrs)) {
        PyErr_SetString(PyExc_TypeError, "new() takes a dict of ggml function addresses");
        return NULL;
    }
    struct lcp_ggml_api api;
    for (size_t i = 0; i < sizeof(lcp_api_names) / sizeof(lcp_api_names[0]); i++) {
        void *p = lcp_address(addrs, lcp_api_names[i].name);
        if (p == NULL) {
            return NULL;
        }
        /* a data pointer converted to a function pointer: fine on every
         * platform CPython and ggml run on */
        memcpy((char *)&api + lcp_api_names[i].offset, &p, sizeof(p));
    }
    lcp_state *s = (lcp_state *)calloc(1, sizeof(lcp_state));
    if (!s) {
        return PyErr_NoMemory();
    }
    s->api = api;
    PyObject *cap = PyCapsule_New(s, LCP_CAPSULE, lcp_capsule_destructor);
    if (!cap) {
        lcp_free(s);
    }
    return cap;
}

PyDoc_STRVAR(callback_address_doc, "callback_address() -> int: address of the eval callback.");
static PyObject *py_callback_address(PyObject *self, PyObject *noargs) {
    return PyLong_FromVoidPtr((void *)(uintptr_t)&lcp_cb_eval);
}

PyDoc_STRVAR(state_address_doc, "state_address(state) -> int: the callback's user_data.");
static PyObject *py_state_address(PyObject *self, PyObject *cap) {
    lcp_state *s = lcp_get(cap);
    if (!s) {
        return NULL;
    }
    return PyLong_FromVoidPtr(s);
}

PyDoc_STRVAR(set_sites_doc, "set_sites(state, [(name, width), ...])\n\n"
                            "Tensors to capture, in the order rows are returned.");
static PyObject *py_set_sites(PyObject *self, PyObject *args) {
    PyObject *cap, *seq;
    if (!PyArg_ParseTuple(args, "OO", &cap, &seq)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    if (!s) {
        return NULL;
    }
    if (!lcp_idle(s, "set_sites")) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "sites must be a sequence of (name, width)");
    if (!fast) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    lcp_site *sites = n ? (lcp_site *)calloc((size_t)n, sizeof(lcp_site)) : NULL;
    if (n && !sites) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name;
        Py_ssize_t len;
        long long width;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "s#L", &name, &len, &width) ||
            !lcp_name_ok(name, len)) {
            free(sites);
            Py_DECREF(fast);
            return NULL;
        }
        if (width <= 0) {
            PyErr_SetString(PyExc_ValueError, "site width must be positive");
            free(sites);
            Py_DECREF(fast);
            return NULL;
        }
        memcpy(sites[i].name, name, (size_t)len + 1);
        sites[i].width = width;
    }
    Py_DECREF(fast);
    free(s->sites);
    s->sites = sites;
    s->n_sites = (int)n;
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(set_patches_doc, "set_patches(state, [(dst, src), ...])\n\n"
                              "After dst is computed, overwrite it with src's value from the same "
                              "ubatch (src must be computed earlier in the graph).");
static PyObject *py_set_patches(PyObject *self, PyObject *args) {
    PyObject *cap, *seq;
    if (!PyArg_ParseTuple(args, "OO", &cap, &seq)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    if (!s) {
        return NULL;
    }
    if (!lcp_idle(s, "set_patches")) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "patches must be a sequence of (dst, src)");
    if (!fast) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > LCP_MAX_PATCHES) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d patches", LCP_MAX_PATCHES);
        return NULL;
    }
    char dst[LCP_MAX_PATCHES][LCP_NAME_MAX], src[LCP_MAX_PATCHES][LCP_NAME_MAX];
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *d, *r;
        Py_ssize_t dl, rl;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "s#s#", &d, &dl, &r, &rl) ||
            !lcp_name_ok(d, dl) || !lcp_name_ok(r, rl)) {
            Py_DECREF(fast);
            return NULL;
        }
        memcpy(dst[i], d, (size_t)dl + 1);
        memcpy(src[i], r, (size_t)rl + 1);
    }
    Py_DECREF(fast);
    for (int i = 0; i < LCP_MAX_PATCHES; i++) {
        lcp_patch *p = &s->patches[i];
        if (i < n) {
            memcpy(p->dst, dst[i], LCP_NAME_MAX);
            memcpy(p->src, src[i], LCP_NAME_MAX);
        } else {
            p->dst[0] = p->src[0] = '\0';
        }
    }
    s->n_patches = (int)n;
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(set_edits_doc,
             "set_edits(state, [(node, mode, values, n_values, width, rows), ...])\n\n"
             "Edits applied to node outputs in every following decode: mode 0 adds, 1 writes "
             "values[rows[i]] (float32 bytes, n_values x width) into the row of batch token i "
             "(rows: int32 bytes, one per batch token, -1 = leave alone). [] clears.");
static PyObject *py_set_edits(PyObject *self, PyObject *args) {
    PyObject *cap, *seq;
    if (!PyArg_ParseTuple(args, "OO", &cap, &seq)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    if (!s || !lcp_idle(s, "set_edits")) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "edits must be a sequence of tuples");
    if (!fast) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    lcp_edit *edits = NULL;
    Py_ssize_t made = 0;
    if (n > LCP_MAX_EDITS) {
        PyErr_Format(PyExc_ValueError, "at most %d edits", LCP_MAX_EDITS);
        goto fail;
    }
    edits = n ? (lcp_edit *)calloc((size_t)n, sizeof(lcp_edit)) : NULL;
    if (n && !edits) {
        PyErr_NoMemory();
        goto fail;
    }
    for (; made < n; made++) {
        lcp_edit *e = &edits[made];
        const char *name;
        Py_ssize_t len;
        int mode;
        Py_buffer values, rows;
        long long n_values, width;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, made), "s#iy*LLy*", &name, &len, &mode, &values,
                              &n_values, &width, &rows)) {
            goto fail;
        }
        int ok = 0;
        if (!lcp_name_ok(name, len)) {
            /* exception set */
        } else if (mode != LCP_EDIT_ADD && mode != LCP_EDIT_SET) {
            PyErr_Format(PyExc_ValueError, "edit on %s: unknown mode %d", name, mode);
        } else if (n_values <= 0 || width <= 0 || (size_t)values.len != (size_t)n_values * (size_t)width * sizeof(float)) {
            PyErr_Format(PyExc_ValueError, "edit on %s: %zd bytes of values for %lld x %lld floats", name,
                         values.len, n_values, width);
        } else if (rows.len % (Py_ssize_t)sizeof(int32_t) != 0) {
            PyErr_Format(PyExc_ValueError, "edit on %s: rows must be int32", name);
        } else {
            memcpy(e->name, name, (size_t)len + 1);
            e->mode = mode;
            e->width = width;
            e->n_values = n_values;
            e->n_rows = rows.len / (Py_ssize_t)sizeof(int32_t);
            e->values = (float *)malloc((size_t)values.len);
            e->rows = (int32_t *)malloc((size_t)rows.len + 1);
            if (!e->values || !e->rows) {
                PyErr_NoMemory();
            } else {
                memcpy(e->values, values.buf, (size_t)values.len);
                memcpy(e->rows, rows.buf, (size_t)rows.len);
                ok = 1;
                for (int64_t i = 0; i < e->n_rows; i++) {
                    if (e->rows[i] < -1 || e->rows[i] >= n_values) {
                        PyErr_Format(PyExc_ValueError, "edit on %s: row %lld selects value %d of %lld", name,
                                     (long long)i, (int)e->rows[i], n_values);
                        ok = 0;
                        break;
                    }
                }
            }
        }
        PyBuffer_Release(&values);
        PyBuffer_Release(&rows);
        if (!ok) {
            made++; /* its buffers are freed with the rest */
            goto fail;
        }
    }
    Py_DECREF(fast);
    lcp_free_edits(s->edits, s->n_edits);
    s->edits = edits;
    s->n_edits = (int)n;
    return Py_NewRef(Py_None);
fail:
    lcp_free_edits(edits, (int)made);
    Py_DECREF(fast);
    return NULL;
}

PyDoc_STRVAR(begin_doc, "begin(state, outputs: bytes, n_ubatch: int, stop: str | None = None)\n\n"
                        "Arm the callback for one llama_decode: outputs[i] != 0 marks batch token "
                        "i as an output; its row is captured as row j (its output ordinal). With "
                        "stop, the graph is cut after that node (llama.cpp's logits are then not "
                        "computed).");
static PyObject *py_begin(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_buffer flags;
    long long n_ubatch;
    const char *stop = NULL;
    Py_ssize_t stop_len = 0;
    if (!PyArg_ParseTuple(args, "Oy*L|z#", &cap, &flags, &n_ubatch, &stop, &stop_len)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    PyObject *ret = NULL;
    if (!s || !lcp_idle(s, "begin")) {
        goto done;
    }
    if (n_ubatch <= 0) {
        PyErr_SetString(PyExc_ValueError, "n_ubatch must be positive");
        goto done;
    }
    if (stop != NULL && !lcp_name_ok(stop, stop_len)) {
        goto done;
    }
    int64_t n = (int64_t)flags.len;
    for (int i = 0; i < s->n_edits; i++) {
        if (s->edits[i].n_rows != n) {
            PyErr_Format(PyExc_ValueError, "edit on %s has %lld rows for a batch of %lld tokens", s->edits[i].name,
                         (long long)s->edits[i].n_rows, (long long)n);
            goto done;
        }
    }
    size_t need = (size_t)n + 1;
    if (need > s->plan_cap) {
        int32_t *a = (int32_t *)realloc(s->tok_dest, need * sizeof(int32_t));
        if (a) {
            s->tok_dest = a;
        }
        int64_t *b = (int64_t *)realloc(s->out_before, need * sizeof(int64_t));
        if (b) {
            s->out_before = b;
        }
        int64_t *c = (int64_t *)realloc(s->out_tok, need * sizeof(int64_t));
        if (c) {
            s->out_tok = c;
        }
        if (!a || !b || !c) {
            PyErr_NoMemory();
            goto done;
        }
        s->plan_cap = need;
    }
    const uint8_t *f = (const uint8_t *)flags.buf;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        s->out_before[i] = m;
        if (f[i]) {
            s->tok_dest[i] = (int32_t)m;
            s->out_tok[m] = i;
            m++;
        } else {
            s->tok_dest[i] = -1;
        }
    }
    s->out_before[n] = m;
    size_t total = 0;
    for (int i = 0; i < s->n_sites; i++) {
        s->sites[i].off = total;
        s->sites[i].seen = 0;
        s->sites[i].copied = 0;
        total += (size_t)m * (size_t)s->sites[i].width;
    }
    if (!lcp_grow((void **)&s->rows, &s->rows_cap, total * sizeof(float) + 1)) {
        PyErr_NoMemory();
        goto done;
    }
    /* NaN marks rows never written, so a missed row cannot pass as data. */
    for (size_t i = 0; i < total; i++) {
        s->rows[i] = NAN;
    }
    for (int i = 0; i < s->n_patches; i++) {
        s->patches[i].src_seen = 0;
        s->patches[i].applied = 0;
        s->patches[i].saved_bytes = 0;
        s->patches[i].saved_rows = 0;
    }
    for (int i = 0; i < s->n_edits; i++) {
        s->edits[i].fired = 0;
        s->edits[i].written = 0;
    }
    s->rows_len = total;
    s->n_tokens = n;
    s->n_ubatch = n_ubatch;
    s->n_outputs = m;
    s->has_err = 0;
    s->err[0] = '\0';
    s->n_calls = 0;
    s->n_stopped = 0;
    if (stop != NULL) {
        memcpy(s->stop, stop, (size_t)stop_len);
        s->stop[stop_len] = '\0';
    } else {
        s->stop[0] = '\0';
    }
    s->active = 1;
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&flags);
    return ret;
}

PyDoc_STRVAR(end_doc, "end(state) -> (error or None, [(seen, copied) per site], [applied per patch], "
                      "[(applied, rows) per edit], calls)\n\n"
                      "Disarm the callback and report what happened during the decode.");
static PyObject *py_end(PyObject *self, PyObject *cap) {
    lcp_state *s = lcp_get(cap);
    if (!s) {
        return NULL;
    }
    s->active = 0;
    PyObject *sites = PyList_New(s->n_sites);
    PyObject *patches = PyList_New(s->n_patches);
    PyObject *edits = PyList_New(s->n_edits);
    PyObject *err = NULL;
    if (!sites || !patches || !edits) {
        goto fail;
    }
    for (int i = 0; i < s->n_sites; i++) {
        PyObject *v = Py_BuildValue("(iL)", s->sites[i].seen, (long long)s->sites[i].copied);
        if (!v) {
            goto fail;
        }
        PyList_SET_ITEM(sites, i, v);
    }
    for (int i = 0; i < s->n_patches; i++) {
        PyObject *v = PyLong_FromLong(s->patches[i].applied);
        if (!v) {
            goto fail;
        }
        PyList_SET_ITEM(patches, i, v);
    }
    for (int i = 0; i < s->n_edits; i++) {
        PyObject *v = Py_BuildValue("(iL)", s->edits[i].fired, (long long)s->edits[i].written);
        if (!v) {
            goto fail;
        }
        PyList_SET_ITEM(edits, i, v);
    }
    err = s->has_err ? PyUnicode_DecodeUTF8(s->err, (Py_ssize_t)strlen(s->err), "replace") : Py_NewRef(Py_None);
    if (!err) {
        goto fail;
    }
    /* N steals the references, also when building the tuple fails */
    return Py_BuildValue("(NNNNL)", err, sites, patches, edits, (long long)s->n_calls);
fail:
    Py_XDECREF(sites);
    Py_XDECREF(patches);
    Py_XDECREF(edits);
    return NULL;
}

PyDoc_STRVAR(read_doc, "read(state, out)\n\n"
                       "Copy the captured rows (float32, [n_sites][n_outputs][width]) into the "
                       "writable buffer out, which must have exactly that many bytes.");
static PyObject *py_read(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "Ow*", &cap, &out)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    if (!s || !lcp_idle(s, "read")) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if ((size_t)out.len != s->rows_len * sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "read: buffer has %zd bytes, captured rows need %zu",
                     out.len, s->rows_len * sizeof(float));
        PyBuffer_Release(&out);
        return NULL;
    }
    if (s->rows_len) {
        memcpy(out.buf, s->rows, s->rows_len * sizeof(float));
    }
    PyBuffer_Release(&out);
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(trace_doc, "trace(state, on: bool) -> (list[str], dropped: int)\n\n"
                        "Return the node names offered since the last call (in graph order), how many "
                        "names did not fit in the trace buffer, and turn tracing on or off.");
static PyObject *py_trace(PyObject *self, PyObject *args) {
    PyObject *cap;
    int on;
    if (!PyArg_ParseTuple(args, "Op", &cap, &on)) {
        return NULL;
    }
    lcp_state *s = lcp_get(cap);
    if (!s || !lcp_idle(s, "trace")) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out) {
        return NULL;
    }
    for (size_t at = 0; at < s->trace_len;) {
        size_t len = strlen(s->trace + at);
        PyObject *name = PyUnicode_DecodeUTF8(s->trace + at, (Py_ssize_t)len, "replace");
        if (!name || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
        at += len + 1;
    }
    long long dropped = (long long)s->trace_dropped;
    s->trace_len = 0;
    s->trace_dropped = 0;
    s->tracing = on;
    return Py_BuildValue("(NL)", out, dropped);
}

/* native/ggml_lens.c */
PyObject *lcp_lens_new(PyObject *self, PyObject *args);
PyObject *lcp_lens_logits(PyObject *self, PyObject *args);

/* native/device_lens.c */
PyObject *lcp_device_lens_new(PyObject *self, PyObject *args);
PyObject *lcp_device_lens_set(PyObject *self, PyObject *args);
PyObject *lcp_device_lens_logits(PyObject *self, PyObject *args);
PyObject *lcp_device_lens_pick(PyObject *self, PyObject *args);
PyObject *lcp_device_lens_info(PyObject *self, PyObject *cap);
PyObject *lcp_device_lens_close(PyObject *self, PyObject *cap);

static PyMethodDef lcp_methods[] = {
    {"lens_new", lcp_lens_new, METH_VARARGS,
     "lens_new(addresses: dict, head, head_type, n_embd, n_vocab) -> lens (see native/ggml_lens.c)"},
    {"lens_logits", lcp_lens_logits, METH_VARARGS,
     "lens_logits(lens, x, out, n_threads): out = x @ head.T with ggml's CPU kernels"},
    {"device_lens_new", lcp_device_lens_new, METH_VARARGS,
     "device_lens_new(addresses: dict, device: int, head_type, n_embd, n_vocab, n_threads) -> lens: a head "
     "buffer on a ggml-backend device (see native/device_lens.c)"},
    {"device_lens_set", lcp_device_lens_set, METH_VARARGS,
     "device_lens_set(lens, offset, data): copy the next head bytes to the device, front to back"},
    {"device_lens_logits", lcp_device_lens_logits, METH_VARARGS,
     "device_lens_logits(lens, x, out, inv_scale, softcap): full logits (n, n_vocab) computed on the device"},
    {"device_lens_pick", lcp_device_lens_pick, METH_VARARGS,
     "device_lens_pick(lens, x, idx int32 (n, k), out float32 (n, k), inv_scale, softcap): log-softmax on the "
     "device, only the idx entries come back"},
    {"device_lens_info", lcp_device_lens_info, METH_O,
     "device_lens_info(lens) -> dict: backend name, head bytes, buffer bytes, bytes set"},
    {"device_lens_close", lcp_device_lens_close, METH_O,
     "device_lens_close(lens): free the device memory now"},
    {"trace", py_trace, METH_VARARGS, trace_doc},
    {"new", py_new, METH_O, new_doc},
    {"callback_address", py_callback_address, METH_NOARGS, callback_address_doc},
    {"state_address", py_state_address, METH_O, state_address_doc},
    {"set_sites", py_set_sites, METH_VARARGS, set_sites_doc},
    {"set_patches", py_set_patches, METH_VARARGS, set_patches_doc},
    {"set_edits", py_set_edits, METH_VARARGS, set_edits_doc},
    {"begin", py_begin, METH_VARARGS, begin_doc},
    {"end", py_end, METH_O, end_doc},
    {"read", py_read, METH_VARARGS, read_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lcp_module = {
    PyModuleDef_HEAD_INIT, "_capture",
    "Row capture from llama.cpp's eval callback (see lcprobe.capture for the Python side).", -1,
    lcp_methods,
};

PyMODINIT_FUNC PyInit__capture(void) { return PyModule_Create(&lcp_module); }
