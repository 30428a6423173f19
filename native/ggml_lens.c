/*
 * The lens head evaluated by ggml on the CPU, with the head as stored in the
 * GGUF (quantized). This is the computation llama.cpp does for its own
 * logits: activations are quantized to the head's dot-product type and the
 * integer kernels run, so it is both faster than a float32 BLAS product on
 * a dequantized head and reproduces llama.cpp's last-layer logits.
 *
 * Like capture.c, nothing here includes ggml headers: the functions come in
 * as addresses from Python, and every ggml context is sized up front so that
 * ggml's own out-of-memory assertion (an abort) cannot trigger.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
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
typedef int (*fn_graph_compute_with_ctx)(void *, void *, int);
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
    fn_graph_compute_with_ctx compute;
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

PyDoc_STRVAR(lens_new_doc,
             "lens_new(addresses: tuple[int, ...], head: bytes-like, head_type: int, n_embd: int, "
             "n_vocab: int) -> lens\n\nCopy the stored head into a ggml context. addresses are, in order: "
             "ggml_init, ggml_free, ggml_new_tensor_2d, ggml_get_data, ggml_nbytes, ggml_mul_mat, "
             "ggml_new_graph, ggml_build_forward_expand, ggml_graph_compute_with_ctx, "
             "ggml_tensor_overhead, ggml_graph_overhead, ggml_row_size.");
PyObject *lcp_lens_new(PyObject *self, PyObject *args) {
    PyObject *addrs;
    Py_buffer head;
    int head_type;
    long long n_embd, n_vocab;
    if (!PyArg_ParseTuple(args, "O!y*iLL", &PyTuple_Type, &addrs, &head, &head_type, &n_embd, &n_vocab)) {
        return NULL;
    }
    PyObject *ret = NULL;
    lcp_lens *l = NULL;
    if (PyTuple_GET_SIZE(addrs) != 12) {
        PyErr_SetString(PyExc_ValueError, "lens_new needs 12 function addresses");
        goto done;
    }
    void *fn[12];
    for (int i = 0; i < 12; i++) {
        fn[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(addrs, i));
        if (!fn[i]) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "a ggml function address is NULL");
            }
            goto done;
        }
    }
    if (n_embd <= 0 || n_vocab <= 0) {
        PyErr_SetString(PyExc_ValueError, "n_embd and n_vocab must be positive");
        goto done;
    }
    l = (lcp_lens *)calloc(1, sizeof(lcp_lens));
    if (!l) {
        PyErr_NoMemory();
        goto done;
    }
    l->init = (fn_init)fn[0];
    l->free = (fn_free)fn[1];
    l->new_tensor_2d = (fn_new_tensor_2d)fn[2];
    l->get_data = (fn_get_data)fn[3];
    l->nbytes = (fn_nbytes)fn[4];
    l->mul_mat = (fn_mul_mat)fn[5];
    l->new_graph = (fn_new_graph)fn[6];
    l->build_forward_expand = (fn_build_forward_expand)fn[7];
    l->compute = (fn_graph_compute_with_ctx)fn[8];
    l->tensor_overhead = (fn_overhead)fn[9];
    l->graph_overhead = (fn_overhead)fn[10];
    l->row_size = (fn_row_size)fn[11];
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
    /* input + result + the activations converted to the head's dot type
     * (never larger than float32) + per-thread padding + bookkeeping */
    size_t mem = (size_t)x.len * 2 + out_bytes + 4 * l->tensor_overhead() + l->graph_overhead() +
                 (size_t)n_threads * 256 + (1u << 20);
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
        status = l->compute(ctx, gf, n_threads);
        if (status == 0) {
            memcpy(out.buf, l->get_data(y), out_bytes);
        }
        l->free(ctx);
        ok = 1;
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
