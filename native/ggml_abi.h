/*
 * The few pieces of ggml's ABI the capture needs.
 *
 * llama-cpp-python installs libggml*.so but no headers, so lcprobe cannot
 * include ggml.h. Instead it declares the leading fields of struct ggml_tensor
 * (stable since 2023) and receives the exported functions as pointers from
 * Python (ctypes resolves them in the loaded libggml-base). Every tensor the
 * callback touches is cross-checked against ggml's own accessors
 * (ggml_nbytes), so a layout change shows up as a reported error instead of
 * wrong numbers or a crash.
 */
#ifndef LCPROBE_GGML_ABI_H
#define LCPROBE_GGML_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LCP_GGML_MAX_DIMS 4

/* ggml_type values used here; the enum values are part of the GGUF format. */
enum {
    LCP_GGML_TYPE_F32 = 0,
    LCP_GGML_TYPE_F16 = 1,
    LCP_GGML_TYPE_BF16 = 30,
};

/* Leading fields of struct ggml_tensor, in declaration order. */
struct lcp_ggml_tensor {
    int32_t type; /* enum ggml_type */
    void *buffer; /* struct ggml_backend_buffer *; NULL until allocated */
    int64_t ne[LCP_GGML_MAX_DIMS];
    size_t nb[LCP_GGML_MAX_DIMS];
    /* ... more fields we never read ... */
};

typedef const char *(*lcp_fn_get_name)(const struct lcp_ggml_tensor *);
typedef size_t (*lcp_fn_nbytes)(const struct lcp_ggml_tensor *);
typedef void (*lcp_fn_tensor_get)(const struct lcp_ggml_tensor *, void *, size_t, size_t);
typedef void (*lcp_fn_tensor_set)(struct lcp_ggml_tensor *, const void *, size_t, size_t);
typedef void (*lcp_fn_half_to_f32_row)(const uint16_t *, float *, int64_t);

struct lcp_ggml_api {
    lcp_fn_get_name get_name;
    lcp_fn_nbytes nbytes;
    lcp_fn_tensor_get tensor_get;
    lcp_fn_tensor_set tensor_set;
    lcp_fn_half_to_f32_row fp16_to_fp32_row;
    lcp_fn_half_to_f32_row bf16_to_fp32_row;
};

#endif
