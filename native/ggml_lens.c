/*
 * The lens head evaluated by ggml on the CPU, with the head as stored in the
 * GGUF (quantized). This is the computation llama.cpp does for its own
 * logits: activations are quantized to the head's dot-product type and the
 * integer kernels run, so it is both faster than a float32 BLAS product on
 * a dequantized head and reproduces llama.cpp's last-layer logits.
 *
 * Like capture.c, nothing here includes ggml headers: the functions come in
 * as addresses from Python, keyed by name, and every ggml context is sized up
 * front so that ggml's own out-of-memory assertion (an abort) cannot trigger:
 * the context holds exactly the input, the result and the graph, and the
 * kernels' scratch space is what ggml_graph_plan asks for, allocated here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LENS_CAPSULE "lcprobe._capture.GgmlLens"

struct lcp_init_params {
    size_t mem_size;
    void *mem_buffer;
    bool no_alloc;
};

typedef void *(*fn_init)(struct lcp_init_params);
typedef void (*fn_free)(void *);
typedef void *(*fn_new_tensor_2d)(void *, int32_t, int64_t, int64_t);
typedef void *(*fn_get_data)(const void *);
typedef size_t (*fn_nbytes)(const void *);
typedef void *(*fn_mul_mat)(void *, void *, void *);
typedef void *(*fn_new_graph)(void *);
typedef void (*fn_build_forward_expand)(void *, void *);
/* struct ggml_cplan (ggml-cpu.h), returned by value from ggml_graph_plan.
 * Only work_size and work_data are touched. The reserve keeps a future,
 * longer struct from writing past ours: a struct this size is returned
 * through a caller-provided buffer on every supported ABI. */
struct lcp_cplan {
    size_t work_size;
    uint8_t *work_data;
    int n_threads;
    void *threadpool;
    void *abort_callback;
    void *abort_callback_data;
    bool use_ref;
    unsigned char reserve[128];
};

typedef struct lcp_cplan (*fn_graph_plan)(const void *, int, void *);
typedef int (*fn_graph_compute)(void *, struct lcp_cplan *);
typedef size_t (*fn_overhead)(void);
typedef size_t (*fn_row_size)(int32_t, int64_t);

typedef struct {
    fn_init init;
    fn_free free;
    fn_new_tensor_2d new_tensor_2d;
    fn_get_data get_data;
    fn_nbytes nbytes;
    fn_mul_mat mul_mat;
    fn_new_graph new_graph;
    fn_build_forward_expand build_forward_expand;
    fn_graph_plan plan;
    fn_graph_compute compute;
    fn_overhead tensor_overhead;
    fn_overhead graph_overhead;
    fn_row_size row_size;

    void *head_ctx;
    void *head; /* (n_embd, n_vocab) in ggml order, as stored in the GGUF */
    int32_t head_type;
    int64_t n_embd;
    int64_t n_vocab;
} lcp_lens;

static void lens_destructor(PyObject *cap) {
    lcp_lens *l = (lcp_lens *)PyCapsule_GetPointer(cap, LENS_CAPSULE);
    if (l) {
        if (l->head_ctx) {
            l->free(l->head_ctx);
        }
        free(l);
    }
}

/* capture.c */
void *lcp_address(PyObject *dict, const char *name);

static const struct {
    const char *name;
    size_t offset;
} lens_api_names[] = {
    {"ggml_init", offsetof(lcp_lens, init)},
    {"ggml_free", offsetof(lcp_lens, free)},
    {"ggml_new_tensor_2d", offsetof(lcp_lens, new_tensor_2d)},
    {"ggml_get_data", offsetof(lcp_lens, get_data)},
    {"ggml_nbytes", offsetof(lcp_lens, nbytes)},
    {"ggml_mul_mat", offsetof(lcp_lens, mul_mat)},
    {"ggml_new_graph", offsetof(lcp_lens, new_graph)},
    {"ggml_build_forward_expand", offsetof(lcp_lens, build_forward_expand)},
    {"ggml_graph_plan", offsetof(lcp_lens, plan)},
    {"ggml_graph_compute", offsetof(lcp_lens, compute)},
    {"ggml_tensor_overhead", offsetof(lcp_lens, tensor_overhead)},
    {"ggml_graph_overhead", offsetof(lcp_lens, graph_overhead)},
    {"ggml_row_size", offsetof(lcp_lens, row_size)},
};

PyDoc_STRVAR(lens_new_doc,
             "lens_new(addresses: dict[str, int], head: bytes-like, head_type: int, n_embd: int, "
             "n_vocab: int) -> lens\n\nCopy the stored head into a ggml context. addresses maps "
             "ggml_init, ggml_free, ggml_new_tensor_2d, ggml_get_data, ggml_nbytes, ggml_mul_mat, "
             "ggml_new_graph, ggml_build_forward_expand, ggml_graph_plan, ggml_graph_compute, "
             "ggml_tensor_overhead, ggml_graph_overhead and ggml_row_size to their addresses.");
PyObject *lcp_lens_new(PyObject *self, PyObject *args) {
    PyObject *addrs;
    Py_buffer head;
    int head_type;
    long long n_embd, n_vocab;
    if (!PyArg_ParseTuple(args, "O!y*iLL", &PyDict_Type, &addrs, &head, &head_type, &n_embd, &n_vocab)) {
        return NULL;
    }
    PyObject *ret = NULL;
    lcp_lens *l = (lcp_lens *)calloc(1, sizeof(lcp_lens));
    if (!l) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < sizeof(lens_api_names) / sizeof(lens_api_names[0]); i++) {
        void *p = lcp_address(addrs, lens_api_names[i].name);
        if (p == NULL) {
            goto done;
        }
        memcpy((char *)l + lens_api_names[i].offset, &p, sizeof(p));
    }
    if (n_embd <= 0 || n_vocab <= 0) {
        PyErr_SetString(PyExc_ValueError, "n_embd and n_vocab must be positive");
        goto done;
    }
    l->head_type = head_type;
    l->n_embd = n_embd;
    l->n_vocab = n_vocab;

    size_t need = l->row_size(head_type, n_embd) * (size_t)n_vocab;
    if ((size_t)head.len != need) {
        PyErr_Format(PyExc_ValueError, "head has %zd bytes; ggml type %d of %lld x %lld needs %zu", head.len,
                     head_type, n_embd, n_vocab, need);
        goto done;
    }
    struct lcp_init_params p = {need + l->tensor_overhead() + 4096, NULL, false};
    l->head_ctx = l->init(p);
    if (!l->head_ctx) {
        PyErr_NoMemory();
        goto done;
    }
    l->head = l->new_tensor_2d(l->head_ctx, head_type, n_embd, n_vocab);
    if (l->nbytes(l->head) != need) {
        PyErr_SetString(PyExc_RuntimeError, "ggml disagrees about the head's size");
        goto done;
    }
    memcpy(l->get_data(l->head), head.buf, need);
    ret = PyCapsule_New(l, LENS_CAPSULE, lens_destructor);
    if (ret) {
        l = NULL; /* owned by the capsule now */
    }
done:
    if (l) {
        if (l->head_ctx) {
            l->free(l->head_ctx);
        }
        free(l);
    }
    PyBuffer_Release(&head);
    return ret;
}

PyDoc_STRVAR(lens_logits_doc,
             "lens_logits(lens, x: float32 (n, n_embd) buffer, out: writable float32 (n, n_vocab) buffer, "
             "n_threads: int)\n\nout = x @ head.T computed by ggml's CPU kernels (the GIL is released).");
PyObject *lcp_lens_logits(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_buffer x, out;
    int n_threads;
    if (!PyArg_ParseTuple(args, "Oy*w*i", &cap, &x, &out, &n_threads)) {
        return NULL;
    }
    PyObject *ret = NULL;
    lcp_lens *l = (lcp_lens *)PyCapsule_GetPointer(cap, LENS_CAPSULE);
    if (!l) {
        goto done;
    }
    size_t row_in = (size_t)l->n_embd * sizeof(float);
    if (x.len <= 0 || (size_t)x.len % row_in != 0) {
        PyErr_Format(PyExc_ValueError, "x has %zd bytes, not a whole number of %lld-float rows", x.len,
                     (long long)l->n_embd);
        goto done;
    }
    int64_t n = (int64_t)((size_t)x.len / row_in);
    size_t out_bytes = (size_t)n * (size_t)l->n_vocab * sizeof(float);
    if ((size_t)out.len != out_bytes) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected %zu", out.len, out_bytes);
        goto done;
    }
    if (n_threads < 1) {
        n_threads = 1;
    }
    /* input and result (each padded to ggml's object alignment), their
     * headers, the graph */
    size_t mem = l->row_size(0 /* F32 */, l->n_embd) * (size_t)n + out_bytes + 2 * 64 + 2 * l->tensor_overhead() +
                 l->graph_overhead();
    int status = 0;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    struct lcp_init_params p = {mem, NULL, false};
    void *ctx = l->init(p);
    if (ctx) {
        void *xt = l->new_tensor_2d(ctx, 0 /* F32 */, l->n_embd, n);
        memcpy(l->get_data(xt), x.buf, (size_t)x.len);
        void *y = l->mul_mat(ctx, l->head, xt);
        void *gf = l->new_graph(ctx);
        l->build_forward_expand(gf, y);
        struct lcp_cplan plan = l->plan(gf, n_threads, NULL);
        void *work = plan.work_size ? malloc(plan.work_size) : NULL;
        if (work || plan.work_size == 0) {
            plan.work_data = (uint8_t *)work;
            status = l->compute(gf, &plan);
            if (status == 0) {
                memcpy(out.buf, l->get_data(y), out_bytes);
            }
            free(work);
            ok = 1;
        }
        l->free(ctx);
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_NoMemory();
        goto done;
    }
    if (status != 0) {
        PyErr_Format(PyExc_RuntimeError, "ggml graph compute failed with status %d", status);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return ret;
}
