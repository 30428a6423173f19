/*
 * The lens head on a ggml-backend device (--lens-backend device): the head
 * lives in a buffer of the device that holds the model's output layer (the
 * CPU, a GPU, an RPC server), and per chunk of rows one small graph runs
 * there: head product, logit scale / soft-cap, a numerically stable
 * log-softmax and a gather of the requested (row, token) entries. Only those
 * few floats per row come back over the bus, never a row of the vocabulary.
 *
 * The log-softmax needs the row's log-sum-exp. ggml has no max-reduction, so
 * it is taken at the row's argmax j: softmax(z)[j] = exp(z_j - lse) is at
 * least 1/n_vocab (never underflows), so lse = z_j - log(softmax(z)[j]) is
 * exact to float rounding, while softmax itself subtracts the row maximum.
 * Both gathers are batched get_rows on z viewed as (1, n_vocab, n): indices
 * stay below n_vocab, so int32 cannot overflow whatever the chunk.
 *
 * As in ggml_lens.c no ggml header is included: the functions arrive as
 * addresses keyed by name (lcprobe.llama.native.device_lens_addresses), taken
 * from the ggml instance llama.cpp runs on. ggml asserts (aborts the process)
 * on bad shapes, out-of-range indices, unsupported ops and writes past a
 * tensor, so all of those are checked here first and become Python errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define DLENS_CAPSULE "lcprobe._capture.DeviceLens"
#define DLENS_GRAPH_SIZE 64 /* nodes + leafs of the largest graph built here, with room */
#define DLENS_TENSORS 32    /* tensor headers per per-call context, with room */
#define DLENS_MAX_OPS 16
#define DLENS_F32 0
#define DLENS_I32 26
/* GGML_TYPE_COUNT of the ggml this was verified against; newer ones only append types */
#define DLENS_TYPE_COUNT 43

struct dl_init_params {
    size_t mem_size;
    void *mem_buffer;
    bool no_alloc;
};

typedef void *(*dl_init_t)(struct dl_init_params);
typedef void (*dl_ptr_void_t)(void *);
typedef void *(*dl_new_tensor_2d_t)(void *, int32_t, int64_t, int64_t);
typedef void *(*dl_unary_t)(void *, void *);
typedef void *(*dl_binary_t)(void *, void *, void *);
typedef void *(*dl_scale_t)(void *, void *, float);
typedef void *(*dl_reshape_2d_t)(void *, void *, int64_t, int64_t);
typedef void *(*dl_reshape_3d_t)(void *, void *, int64_t, int64_t, int64_t);
typedef void *(*dl_new_graph_custom_t)(void *, size_t, bool);
typedef void (*dl_build_forward_expand_t)(void *, void *);
typedef size_t (*dl_overhead_t)(void);
typedef size_t (*dl_graph_overhead_custom_t)(size_t, bool);
typedef size_t (*dl_row_size_t)(int32_t, int64_t);
typedef int64_t (*dl_blck_size_t)(int32_t);
typedef size_t (*dl_nbytes_t)(const void *);
typedef const char *(*dl_op_desc_t)(const void *);
typedef void *(*dl_dev_init_t)(void *, const char *);
typedef void *(*dl_ptr_ptr_t)(void *);
typedef void *(*dl_alloc_ctx_tensors_t)(void *, void *);
typedef void (*dl_tensor_set_t)(void *, const void *, size_t, size_t);
typedef void (*dl_tensor_get_t)(const void *, void *, size_t, size_t);
typedef bool (*dl_alloc_graph_t)(void *, void *);
typedef int (*dl_graph_compute_t)(void *, void *);
typedef bool (*dl_supports_op_t)(void *, const void *);
typedef void *(*dl_proc_address_t)(void *, const char *);
typedef void (*dl_set_n_threads_t)(void *, int);
typedef const char *(*dl_name_t)(void *);
typedef size_t (*dl_buffer_size_t)(void *);

typedef struct {
    dl_init_t init;
    dl_ptr_void_t free_ctx;
    dl_new_tensor_2d_t new_tensor_2d;
    dl_binary_t mul_mat;
    dl_scale_t scale;
    dl_unary_t tanh;
    dl_unary_t soft_max;
    dl_unary_t argmax;
    dl_unary_t log;
    dl_binary_t get_rows;
    dl_binary_t sub;
    dl_reshape_2d_t reshape_2d;
    dl_reshape_3d_t reshape_3d;
    dl_new_graph_custom_t new_graph_custom;
    dl_build_forward_expand_t build_forward_expand;
    dl_ptr_void_t set_input;
    dl_ptr_void_t set_output;
    dl_overhead_t tensor_overhead;
    dl_graph_overhead_custom_t graph_overhead_custom;
    dl_row_size_t row_size;
    dl_blck_size_t blck_size;
    dl_nbytes_t nbytes;
    dl_op_desc_t op_desc;
    dl_dev_init_t dev_init;
    dl_ptr_void_t backend_free;
    dl_name_t backend_name;
    dl_ptr_ptr_t default_buffer_type;
    dl_alloc_ctx_tensors_t alloc_ctx_tensors;
    dl_ptr_void_t buffer_free;
    dl_buffer_size_t buffer_size;
    dl_tensor_set_t tensor_set;
    dl_tensor_get_t tensor_get;
    dl_ptr_ptr_t gallocr_new;
    dl_ptr_void_t gallocr_free;
    dl_alloc_graph_t gallocr_alloc_graph;
    dl_graph_compute_t graph_compute;
    dl_supports_op_t supports_op;
    dl_ptr_ptr_t dev_backend_reg;
    dl_proc_address_t reg_proc_address;

    void *backend;
    void *head_ctx;
    void *head_buf;
    void *head; /* (n_embd, n_vocab) in ggml order */
    void *galloc;
    int32_t head_type;
    int64_t n_embd;
    int64_t n_vocab;
    size_t row_bytes;
    size_t head_bytes;
    size_t uploaded; /* bytes of the head set so far, front to back */
    bool busy;       /* a call runs without the GIL: another thread must not enter or close */
} dl_lens;

/* capture.c */
void *lcp_address(PyObject *dict, const char *name);

static const struct {
    const char *name;
    size_t offset;
} dl_api_names[] = {
    {"ggml_init", offsetof(dl_lens, init)},
    {"ggml_free", offsetof(dl_lens, free_ctx)},
    {"ggml_new_tensor_2d", offsetof(dl_lens, new_tensor_2d)},
    {"ggml_mul_mat", offsetof(dl_lens, mul_mat)},
    {"ggml_scale", offsetof(dl_lens, scale)},
    {"ggml_tanh", offsetof(dl_lens, tanh)},
    {"ggml_soft_max", offsetof(dl_lens, soft_max)},
    {"ggml_argmax", offsetof(dl_lens, argmax)},
    {"ggml_log", offsetof(dl_lens, log)},
    {"ggml_get_rows", offsetof(dl_lens, get_rows)},
    {"ggml_sub", offsetof(dl_lens, sub)},
    {"ggml_reshape_2d", offsetof(dl_lens, reshape_2d)},
    {"ggml_reshape_3d", offsetof(dl_lens, reshape_3d)},
    {"ggml_new_graph_custom", offsetof(dl_lens, new_graph_custom)},
    {"ggml_build_forward_expand", offsetof(dl_lens, build_forward_expand)},
    {"ggml_set_input", offsetof(dl_lens, set_input)},
    {"ggml_set_output", offsetof(dl_lens, set_output)},
    {"ggml_tensor_overhead", offsetof(dl_lens, tensor_overhead)},
    {"ggml_graph_overhead_custom", offsetof(dl_lens, graph_overhead_custom)},
    {"ggml_row_size", offsetof(dl_lens, row_size)},
    {"ggml_blck_size", offsetof(dl_lens, blck_size)},
    {"ggml_nbytes", offsetof(dl_lens, nbytes)},
    {"ggml_op_desc", offsetof(dl_lens, op_desc)},
    {"ggml_backend_dev_init", offsetof(dl_lens, dev_init)},
    {"ggml_backend_free", offsetof(dl_lens, backend_free)},
    {"ggml_backend_name", offsetof(dl_lens, backend_name)},
    {"ggml_backend_get_default_buffer_type", offsetof(dl_lens, default_buffer_type)},
    {"ggml_backend_alloc_ctx_tensors", offsetof(dl_lens, alloc_ctx_tensors)},
    {"ggml_backend_buffer_free", offsetof(dl_lens, buffer_free)},
    {"ggml_backend_buffer_get_size", offsetof(dl_lens, buffer_size)},
    {"ggml_backend_tensor_set", offsetof(dl_lens, tensor_set)},
    {"ggml_backend_tensor_get", offsetof(dl_lens, tensor_get)},
    {"ggml_gallocr_new", offsetof(dl_lens, gallocr_new)},
    {"ggml_gallocr_free", offsetof(dl_lens, gallocr_free)},
    {"ggml_gallocr_alloc_graph", offsetof(dl_lens, gallocr_alloc_graph)},
    {"ggml_backend_graph_compute", offsetof(dl_lens, graph_compute)},
    {"ggml_backend_supports_op", offsetof(dl_lens, supports_op)},
    {"ggml_backend_dev_backend_reg", offsetof(dl_lens, dev_backend_reg)},
    {"ggml_backend_reg_get_proc_address", offsetof(dl_lens, reg_proc_address)},
};

static void dl_release(dl_lens *l) {
    if (!l) {
        return;
    }
    if (l->galloc) {
        l->gallocr_free(l->galloc);
    }
    if (l->head_buf) {
        l->buffer_free(l->head_buf);
    }
    if (l->head_ctx) {
        l->free_ctx(l->head_ctx);
    }
    if (l->backend) {
        l->backend_free(l->backend);
    }
    free(l);
}

static void dl_destructor(PyObject *cap) {
    dl_release((dl_lens *)PyCapsule_GetPointer(cap, DLENS_CAPSULE));
}

static dl_lens *dl_get(PyObject *cap) {
    dl_lens *l = (dl_lens *)PyCapsule_GetPointer(cap, DLENS_CAPSULE);
    if (l && l->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the device lens is in use by another thread");
        return NULL;
    }
    if (l && !l->backend) {
        PyErr_SetString(PyExc_ValueError, "the device lens was closed");
        return NULL;
    }
    return l;
}

PyObject *lcp_device_lens_new(PyObject *self, PyObject *args) {
    PyObject *addrs, *dev_obj;
    int head_type, n_threads;
    long long n_embd, n_vocab;
    if (!PyArg_ParseTuple(args, "O!OiLLi", &PyDict_Type, &addrs, &dev_obj, &head_type, &n_embd, &n_vocab,
                          &n_threads)) {
        return NULL;
    }
    void *device = PyLong_AsVoidPtr(dev_obj);
    if (device == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "the device handle is NULL");
        }
        return NULL;
    }
    if (n_embd <= 0 || n_vocab <= 0 || n_vocab > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "bad head shape %lld x %lld", n_embd, n_vocab);
        return NULL;
    }
    if (head_type < 0 || head_type >= DLENS_TYPE_COUNT) {
        PyErr_Format(PyExc_ValueError, "bad ggml type %d", head_type);
        return NULL;
    }
    dl_lens *l = (dl_lens *)calloc(1, sizeof(dl_lens));
    if (!l) {
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < sizeof(dl_api_names) / sizeof(dl_api_names[0]); i++) {
        void *p = lcp_address(addrs, dl_api_names[i].name);
        if (p == NULL) {
            free(l);
            return NULL;
        }
        memcpy((char *)l + dl_api_names[i].offset, &p, sizeof(p));
    }
    l->head_type = head_type;
    l->n_embd = n_embd;
    l->n_vocab = n_vocab;
    /* removed types have a zero block size (ggml_row_size would divide by it) */
    int64_t blck = l->blck_size(head_type);
    l->row_bytes = blck > 0 && n_embd % blck == 0 ? l->row_size(head_type, n_embd) : 0;
    if (l->row_bytes == 0) {
        PyErr_Format(PyExc_ValueError, "ggml type %d cannot hold rows of %lld", head_type, n_embd);
        free(l);
        return NULL;
    }
    l->head_bytes = l->row_bytes * (size_t)n_vocab;

    const char *fail = NULL;
    Py_BEGIN_ALLOW_THREADS
    l->backend = l->dev_init(device, NULL);
    if (!l->backend) {
        fail = "the device could not be initialised";
    }
    if (!fail && n_threads > 0) {
        /* only the CPU backend has threads; a GPU's registry has no such function */
        void *reg = l->dev_backend_reg(device);
        dl_set_n_threads_t set_threads =
            reg ? (dl_set_n_threads_t)l->reg_proc_address(reg, "ggml_backend_set_n_threads") : NULL;
        if (set_threads) {
            set_threads(l->backend, n_threads);
        }
    }
    if (!fail) {
        struct dl_init_params p = {2 * l->tensor_overhead(), NULL, true};
        l->head_ctx = l->init(p);
        if (!l->head_ctx) {
            fail = "out of memory for the head's context";
        }
    }
    if (!fail) {
        l->head = l->new_tensor_2d(l->head_ctx, head_type, n_embd, n_vocab);
        if (l->nbytes(l->head) != l->head_bytes) {
            fail = "ggml disagrees about the head's size";
        }
    }
    if (!fail) {
        l->head_buf = l->alloc_ctx_tensors(l->head_ctx, l->backend);
        if (!l->head_buf) {
            fail = "the device has no room for the head";
        }
    }
    if (!fail) {
        l->galloc = l->gallocr_new(l->default_buffer_type(l->backend));
        if (!l->galloc) {
            fail = "the device's graph allocator could not be created";
        }
    }
    Py_END_ALLOW_THREADS
    if (fail) {
        PyErr_Format(PyExc_RuntimeError, "device lens: %s (%lld x %lld head of ggml type %d, %zu bytes)", fail,
                     n_embd, n_vocab, head_type, l->head_bytes);
        dl_release(l);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(l, DLENS_CAPSULE, dl_destructor);
    if (!cap) {
        dl_release(l);
    }
    return cap;
}

PyObject *lcp_device_lens_set(PyObject *self, PyObject *args) {
    PyObject *cap;
    unsigned long long offset;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "OKy*", &cap, &offset, &data)) {
        return NULL;
    }
    PyObject *ret = NULL;
    dl_lens *l = dl_get(cap);
    if (!l) {
        goto done;
    }
    size_t size = (size_t)data.len;
    /* front to back, so that "complete" is one comparison and a half-set head never computes */
    if (offset != l->uploaded || size > l->head_bytes - l->uploaded) {
        PyErr_Format(PyExc_ValueError, "head bytes [%llu, %llu) do not continue the %zu set of %zu", offset,
                     offset + (unsigned long long)size, l->uploaded, l->head_bytes);
        goto done;
    }
    if (size) {
        l->busy = true;
        Py_BEGIN_ALLOW_THREADS
        l->tensor_set(l->head, data.buf, (size_t)offset, size);
        Py_END_ALLOW_THREADS
        l->busy = false;
        l->uploaded += size;
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    return ret;
}

/* Head product, scale and soft-cap, as Unembed.logits applies them. Appends every op to ops. */
static void *dl_logits_graph(dl_lens *l, void *ctx, void *x, float inv_scale, float softcap, void **ops, int *n_ops) {
    void *z = l->mul_mat(ctx, l->head, x);
    ops[(*n_ops)++] = z;
    if (inv_scale != 1.0f) {
        z = l->scale(ctx, z, inv_scale);
        ops[(*n_ops)++] = z;
    }
    if (softcap != 0.0f) {
        z = l->scale(ctx, z, 1.0f / softcap);
        ops[(*n_ops)++] = z;
        z = l->tanh(ctx, z);
        ops[(*n_ops)++] = z;
        z = l->scale(ctx, z, softcap);
        ops[(*n_ops)++] = z;
    }
    return z;
}

/* Tensors of one computation and the host memory they come from / go to; idx may be NULL. */
typedef struct {
    void *x;
    const void *x_data;
    void *idx;
    const void *idx_data;
    void *out;
    void *out_data;
    size_t out_bytes;
} dl_io;

/* Check, allocate and run one graph on the device; fills err on failure. */
static void dl_run(dl_lens *l, void *ctx, void **ops, int n_ops, dl_io *io, char *err, size_t err_len) {
    for (int i = 0; i < n_ops; i++) {
        if (!l->supports_op(l->backend, ops[i])) {
            snprintf(err, err_len, "the %s backend cannot run %s here", l->backend_name(l->backend),
                     l->op_desc(ops[i]));
            return;
        }
    }
    if (l->nbytes(io->out) != io->out_bytes) {
        snprintf(err, err_len, "result has %zu bytes, expected %zu", l->nbytes(io->out), io->out_bytes);
        return;
    }
    void *gf = l->new_graph_custom(ctx, DLENS_GRAPH_SIZE, false);
    l->build_forward_expand(gf, io->out);
    if (!l->gallocr_alloc_graph(l->galloc, gf)) {
        snprintf(err, err_len, "the %s device has no room for the lens' compute buffer",
                 l->backend_name(l->backend));
        return;
    }
    l->tensor_set(io->x, io->x_data, 0, l->nbytes(io->x));
    if (io->idx) {
        l->tensor_set(io->idx, io->idx_data, 0, l->nbytes(io->idx));
    }
    int status = l->graph_compute(l->backend, gf);
    if (status != 0) {
        snprintf(err, err_len, "graph compute on %s failed with status %d", l->backend_name(l->backend), status);
        return;
    }
    l->tensor_get(io->out, io->out_data, 0, io->out_bytes);
}

/* Rows of x as a new input tensor; checks the buffer holds whole rows. Returns n or -1. */
static int64_t dl_rows(dl_lens *l, Py_buffer *x) {
    size_t row_in = (size_t)l->n_embd * sizeof(float);
    if (x->len <= 0 || (size_t)x->len % row_in != 0) {
        PyErr_Format(PyExc_ValueError, "x has %zd bytes, not a whole number of %lld-float rows", x->len,
                     (long long)l->n_embd);
        return -1;
    }
    int64_t n = (int64_t)((size_t)x->len / row_in);
    /* kernels on some devices index a chunk's logits with int32: the caller chunks rows */
    if (n > INT32_MAX / l->n_vocab) {
        PyErr_Format(PyExc_ValueError, "%lld rows x %lld vocabulary is over 2^31 logits: pass fewer rows",
                     (long long)n, (long long)l->n_vocab);
        return -1;
    }
    if (l->uploaded != l->head_bytes) {
        PyErr_Format(PyExc_ValueError, "the head is not fully set (%zu of %zu bytes)", l->uploaded, l->head_bytes);
        return -1;
    }
    return n;
}

static void *dl_context(dl_lens *l) {
    struct dl_init_params p = {DLENS_TENSORS * l->tensor_overhead() + l->graph_overhead_custom(DLENS_GRAPH_SIZE, false),
                               NULL, true};
    return l->init(p);
}

/* What a compute run without the GIL ended in, as Python sees it: None, or the exception. */
static PyObject *dl_outcome(bool no_ctx, const char *err) {
    if (no_ctx) {
        return PyErr_NoMemory();
    }
    if (err[0]) {
        PyErr_Format(PyExc_RuntimeError, "device lens: %s", err);
        return NULL;
    }
    return Py_NewRef(Py_None);
}

PyObject *lcp_device_lens_logits(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_buffer x, out;
    float inv_scale, softcap;
    if (!PyArg_ParseTuple(args, "Oy*w*ff", &cap, &x, &out, &inv_scale, &softcap)) {
        return NULL;
    }
    PyObject *ret = NULL;
    dl_lens *l = dl_get(cap);
    int64_t n = l ? dl_rows(l, &x) : -1;
    if (n < 0) {
        goto done;
    }
    size_t out_bytes = (size_t)n * (size_t)l->n_vocab * sizeof(float);
    if ((size_t)out.len != out_bytes) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected %zu", out.len, out_bytes);
        goto done;
    }
    char err[256] = "";
    bool no_ctx = false;
    l->busy = true;
    Py_BEGIN_ALLOW_THREADS
    void *ctx = dl_context(l);
    if (ctx) {
        void *ops[DLENS_MAX_OPS];
        int n_ops = 0;
        void *xt = l->new_tensor_2d(ctx, DLENS_F32, l->n_embd, n);
        l->set_input(xt);
        void *z = dl_logits_graph(l, ctx, xt, inv_scale, softcap, ops, &n_ops);
        l->set_output(z);
        dl_io io = {xt, x.buf, NULL, NULL, z, out.buf, out_bytes};
        dl_run(l, ctx, ops, n_ops, &io, err, sizeof(err));
        l->free_ctx(ctx);
    } else {
        no_ctx = true;
    }
    Py_END_ALLOW_THREADS
    l->busy = false;
    ret = dl_outcome(no_ctx, err);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return ret;
}

PyObject *lcp_device_lens_pick(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_buffer x, idx, out;
    float inv_scale, softcap;
    if (!PyArg_ParseTuple(args, "Oy*y*w*ff", &cap, &x, &idx, &out, &inv_scale, &softcap)) {
        return NULL;
    }
    PyObject *ret = NULL;
    dl_lens *l = dl_get(cap);
    int64_t n = l ? dl_rows(l, &x) : -1;
    if (n < 0) {
        goto done;
    }
    size_t per_row = (size_t)n * sizeof(int32_t);
    if (idx.len <= 0 || (size_t)idx.len % per_row != 0) {
        PyErr_Format(PyExc_ValueError, "idx has %zd bytes, not k int32 per each of %lld rows", idx.len,
                     (long long)n);
        goto done;
    }
    int64_t k = (int64_t)((size_t)idx.len / per_row);
    size_t out_bytes = (size_t)n * (size_t)k * sizeof(float);
    if ((size_t)out.len != out_bytes) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected %zu", out.len, out_bytes);
        goto done;
    }
    /* ggml's get_rows asserts (CPU) or reads out of bounds (GPU) on a bad index */
    const int32_t *ids = (const int32_t *)idx.buf;
    for (int64_t i = 0; i < n * k; i++) {
        if (ids[i] < 0 || ids[i] >= l->n_vocab) {
            PyErr_Format(PyExc_ValueError, "token id %d is outside the vocabulary (%lld)", ids[i],
                         (long long)l->n_vocab);
            goto done;
        }
    }
    char err[256] = "";
    bool no_ctx = false;
    l->busy = true;
    Py_BEGIN_ALLOW_THREADS
    void *ctx = dl_context(l);
    if (ctx) {
        void *ops[DLENS_MAX_OPS];
        int n_ops = 0;
        void *xt = l->new_tensor_2d(ctx, DLENS_F32, l->n_embd, n);
        l->set_input(xt);
        void *it = l->new_tensor_2d(ctx, DLENS_I32, k, n);
        l->set_input(it);
        void *z = dl_logits_graph(l, ctx, xt, inv_scale, softcap, ops, &n_ops); /* (n_vocab, n) */
        void *z3 = l->reshape_3d(ctx, z, 1, l->n_vocab, n);                     /* one-float rows per row */
        void *am = l->argmax(ctx, z);                                           /* (n) */
        ops[n_ops++] = am;
        void *zmax = l->get_rows(ctx, z3, l->reshape_2d(ctx, am, 1, n)); /* (1, 1, n) */
        ops[n_ops++] = zmax;
        void *p = l->soft_max(ctx, z);
        ops[n_ops++] = p;
        void *pmax = l->get_rows(ctx, l->reshape_3d(ctx, p, 1, l->n_vocab, n), l->reshape_2d(ctx, am, 1, n));
        ops[n_ops++] = pmax;
        void *logp = l->log(ctx, pmax);
        ops[n_ops++] = logp;
        void *lse = l->sub(ctx, zmax, logp); /* (1, 1, n) */
        ops[n_ops++] = lse;
        void *picked = l->get_rows(ctx, z3, it); /* (1, k, n) */
        ops[n_ops++] = picked;
        void *res = l->sub(ctx, picked, lse); /* broadcast over k */
        ops[n_ops++] = res;
        l->set_output(res);
        dl_io io = {xt, x.buf, it, idx.buf, res, out.buf, out_bytes};
        dl_run(l, ctx, ops, n_ops, &io, err, sizeof(err));
        l->free_ctx(ctx);
    } else {
        no_ctx = true;
    }
    Py_END_ALLOW_THREADS
    l->busy = false;
    ret = dl_outcome(no_ctx, err);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&out);
    return ret;
}

PyObject *lcp_device_lens_info(PyObject *self, PyObject *cap) {
    dl_lens *l = dl_get(cap);
    if (!l) {
        return NULL;
    }
    return Py_BuildValue("{s:s,s:n,s:n,s:n}", "backend", l->backend_name(l->backend), "head_bytes",
                         (Py_ssize_t)l->head_bytes, "head_buffer_bytes", (Py_ssize_t)l->buffer_size(l->head_buf),
                         "uploaded", (Py_ssize_t)l->uploaded);
}

PyObject *lcp_device_lens_close(PyObject *self, PyObject *cap) {
    dl_lens *l = (dl_lens *)PyCapsule_GetPointer(cap, DLENS_CAPSULE);
    if (!l) {
        return NULL;
    }
    if (l->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the device lens is in use by another thread");
        return NULL;
    }
    /* free the device memory now, keep the (emptied) struct for the capsule's destructor */
    if (l->galloc) {
        l->gallocr_free(l->galloc);
        l->galloc = NULL;
    }
    if (l->head_buf) {
        l->buffer_free(l->head_buf);
        l->head_buf = NULL;
    }
    if (l->head_ctx) {
        l->free_ctx(l->head_ctx);
        l->head_ctx = NULL;
    }
    if (l->backend) {
        l->backend_free(l->backend);
        l->backend = NULL;
    }
    Py_RETURN_NONE;
}
