"""The C extension's boundary: interventions (edits) inside llama.cpp's forward
pass against the numpy reference, and the native state's own contracts.

Edits are checked on the synthetic LLaMA (f32 KV cache, no flash attention,
so llama.cpp reproduces the float64 reference to ~1e-6): the reference is
continued from the edited residual stream by feeding it in as the
"embedding" of a model made of the remaining blocks.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lcprobe.errors import CaptureError
from lcprobe.files.modelfile import read_model_info
from lcprobe.llama.capture import Capture, Edit, Site
from lcprobe.llama.engine import Engine, EngineConfig

from synth import reference_forward

RTOL = 1e-4  # as in test_capture.py: llama.cpp f32 vs numpy float64, relative to the row norm


def _engine(path, **kw) -> Engine:
    cfg = dict(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=4, n_threads=2, kv_type="f32", flash_attn="off")
    cfg.update(kw)
    return Engine(read_model_info(path), EngineConfig(**cfg))


def _tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 200, size=n)]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def _continue_reference(weights, spec, h: np.ndarray, after: int) -> dict:
    """The reference forward of blocks after+1.. starting from residual h (T, n_embd).

    Token i is given the embedding h[i]: the remaining blocks then see exactly
    the edited stream, at the same positions."""
    w = {"token_embd.weight": h, "output_norm.weight": weights["output_norm.weight"]}
    if "output.weight" in weights:
        w["output.weight"] = weights["output.weight"]
    for new, old in enumerate(range(after + 1, spec.n_layer)):
        for name, value in weights.items():
            if name.startswith(f"blk.{old}."):
                w[f"blk.{new}." + name[len(f"blk.{old}.") :]] = value
    rest = dataclasses.replace(spec, n_layer=spec.n_layer - after - 1)
    return reference_forward(w, rest, list(range(len(h))))


def _all_layers(info) -> list[Site]:
    return [Site(f"l_out-{i}", info.n_embd) for i in range(info.n_layer)]


@pytest.mark.parametrize("layer", [0, 2])
def test_added_vector_matches_reference(synth_model, layer):
    """x += v at l_out-<layer> on some tokens, across ubatches of 8, with only some
    tokens as outputs (so the last layer is trimmed to them)."""
    path, spec, weights = synth_model
    toks = _tokens(21, 10)
    rng = np.random.default_rng(11)
    values = rng.standard_normal((2, spec.n_embd)).astype(np.float32)
    rows = np.full(len(toks), -1, np.int32)
    rows[[0, 3, 4, 5, 9, 16, 20]] = [0, 1, 1, 0, 0, 1, 1]
    outputs = np.zeros(len(toks), bool)
    outputs[[2, 3, 9, 10, 20]] = True

    ref = reference_forward(weights, spec, toks)
    h = np.asarray(ref["l_out"][layer]).copy()
    sel = rows >= 0
    h[sel] += values[rows[sel]]
    if layer + 1 < spec.n_layer:
        rest = _continue_reference(weights, spec, h, layer)
        want = [np.asarray(ref["l_out"][i]) for i in range(layer)] + [h] + list(rest["l_out"])
        want_logits = np.asarray(rest["logits"])
    else:
        want = [np.asarray(ref["l_out"][i]) for i in range(layer)] + [h]
        want_logits = None

    with _engine(path, n_ubatch=8) as eng:
        eng.set_sites(_all_layers(eng.info))
        eng.capture.set_edits([Edit(f"l_out-{layer}", "add", values, rows)])
        got, logits = eng.decode_sequence(toks, outputs, want_logits=True)
        # on the trimmed last layer only the output tokens' rows exist
        n_edited = int((sel & outputs).sum()) if layer == spec.n_layer - 1 else int(sel.sum())
        assert sum(eng.capture.edited_rows) == n_edited
        eng.capture.set_edits([])
        plain, _ = eng.decode_sequence(toks, outputs)
    for i in range(spec.n_layer):
        assert _rel_err(got[i], want[i][outputs]) < RTOL, f"l_out-{i}"
    if want_logits is not None:
        np.testing.assert_array_equal(logits.argmax(-1), want_logits[outputs].argmax(-1))
    # the edit changed what it should, and clearing it restores the plain run
    assert not np.allclose(got[layer], plain[layer])
    for i in range(spec.n_layer):
        assert _rel_err(plain[i], np.asarray(ref["l_out"][i])[outputs]) < RTOL


def test_set_from_another_run_reproduces_it(synth_model):
    """Writing run A's l_out-0 rows into run B makes B's later layers A's, bit for bit;
    the rows select the values through a permutation."""
    path, spec, _ = synth_model
    a, b = _tokens(19, 20), _tokens(19, 21)
    with _engine(path, n_ubatch=8) as eng:
        eng.set_sites(_all_layers(eng.info))
        ra, _ = eng.decode_sequence(a)
        perm = np.random.default_rng(0).permutation(len(a)).astype(np.int32)
        values = np.ascontiguousarray(ra[0][perm])  # values[j] = A's row perm[j]
        rows = np.argsort(perm).astype(np.int32)  # token i takes values[k] with perm[k] == i
        eng.capture.set_edits([Edit("l_out-0", "set", values, rows)])
        rb, _ = eng.decode_sequence(b)
        eng.capture.set_edits([])
        rb_plain, _ = eng.decode_sequence(b)
    np.testing.assert_array_equal(rb, ra)
    assert not np.allclose(rb_plain[1], ra[1])


def test_edit_mistakes_are_one_line_errors(synth_model):
    path, spec, _ = synth_model
    v = np.ones((1, spec.n_embd), np.float32)
    with _engine(path) as eng:
        eng.set_sites(_all_layers(eng.info))
        cap = eng.capture
        with pytest.raises(CaptureError, match="row index 1 outside"):
            cap.set_edits([Edit("l_out-0", "add", v, np.array([0, 1, -1], np.int32))])
        with pytest.raises(CaptureError, match="mode"):
            cap.set_edits([Edit("l_out-0", "mul", v, np.zeros(3, np.int32))])
        with pytest.raises(CaptureError, match="float32"):
            cap.set_edits([Edit("l_out-0", "add", v.astype(np.float64), np.zeros(3, np.int32))])
        with pytest.raises(CaptureError, match="int32"):
            cap.set_edits([Edit("l_out-0", "add", v, np.zeros(3, np.int64))])
        # rows must match the batch: refused before llama.cpp runs
        cap.set_edits([Edit("l_out-0", "add", v, np.zeros(4, np.int32))])
        with pytest.raises(CaptureError, match="4 rows but the batch has 3 tokens"):
            eng.decode_sequence([5, 6, 7])
        # a width the node does not have: reported after the decode
        wide = np.ones((1, spec.n_embd + 1), np.float32)
        cap.set_edits([Edit("l_out-1", "add", wide, np.zeros(3, np.int32))])
        with pytest.raises(CaptureError, match=f"width {spec.n_embd}.*{spec.n_embd + 1}"):
            eng.decode_sequence([5, 6, 7])
        cap.set_edits([Edit("no_such_node-1", "set", v, np.zeros(3, np.int32))])
        with pytest.raises(CaptureError, match="ran 0 times"):
            eng.decode_sequence([5, 6, 7])
        # nothing was left half-armed: the engine still works
        cap.set_edits([])
        rows, _ = eng.decode_sequence([5, 6, 7])
        assert np.isfinite(rows).all()


def test_nothing_changes_while_a_decode_is_armed():
    """The thread contract: between begin and end the state refuses changes."""
    cap = Capture()
    cap.set_sites([Site("l_out-0", 8)])
    cap.begin(np.ones(3, bool), 8)
    for call in (
        lambda: cap.set_sites([]),
        lambda: cap.set_patches([]),
        lambda: cap.set_edits([]),
        lambda: cap.begin(np.ones(3, bool), 8),
        lambda: cap.trace(False),
    ):
        with pytest.raises(CaptureError, match="in progress"):
            call()
    cap.abort()
    cap.set_sites([])  # allowed again


def test_addresses_are_bound_by_name():
    from lcprobe.llama.native import extension, ggml_addresses

    addrs = dict(ggml_addresses())
    ext = extension()
    assert ext.new(addrs) is not None
    del addrs["ggml_nbytes"]
    with pytest.raises(ValueError, match="ggml_nbytes is missing"):
        ext.new(addrs)


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture
def padded_view():
    """A real ggml tensor whose rows are padded: a 4-wide view into rows 1..3 of a
    6 x 4 float32 tensor in a CPU backend buffer. ggml_nbytes of the view is
    2 * 24 + 16 bytes, so reading rows * nb1 = 72 bytes would trip ggml's
    out-of-bounds assertion. Yields (view, read_base, base_values)."""
    import llama_cpp  # noqa: F401  (loads the same libggml-base the capture uses)

    from lcprobe.llama.native import _ggml_base_library

    lib = ctypes.CDLL(str(_ggml_base_library(Path(llama_cpp.__file__).resolve().parent / "lib")))
    P = ctypes.c_void_p
    lib.ggml_init.restype, lib.ggml_init.argtypes = P, [_GgmlInitParams]
    lib.ggml_new_tensor_2d.restype = P
    lib.ggml_new_tensor_2d.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_view_2d.restype = P
    lib.ggml_view_2d.argtypes = [P, P, ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_set_name.restype, lib.ggml_set_name.argtypes = P, [P, ctypes.c_char_p]
    lib.ggml_backend_cpu_buffer_type.restype = P
    lib.ggml_backend_alloc_ctx_tensors_from_buft.restype = P
    lib.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [P, P]
    lib.ggml_backend_tensor_set.argtypes = [P, P, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.argtypes = [P, P, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_buffer_free.argtypes = [P]
    lib.ggml_free.argtypes = [P]

    ctx = lib.ggml_init(_GgmlInitParams(1 << 16, None, True))
    base = lib.ggml_new_tensor_2d(ctx, 0, 6, 4)
    lib.ggml_set_name(base, b"base")
    view = lib.ggml_view_2d(ctx, base, 4, 3, 6 * 4, 6 * 4)
    lib.ggml_set_name(view, b"l_out-0")
    buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, lib.ggml_backend_cpu_buffer_type())
    assert buf
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    lib.ggml_backend_tensor_set(base, values.ctypes.data, 0, values.nbytes)

    def read_base() -> np.ndarray:
        out = np.empty((4, 6), np.float32)
        lib.ggml_backend_tensor_get(base, out.ctypes.data, 0, out.nbytes)
        return out

    yield view, read_base, values
    lib.ggml_backend_buffer_free(buf)
    lib.ggml_free(ctx)


def _fire(cap: Capture, tensor: int) -> None:
    """What llama.cpp's scheduler does for one node: ask, then (if wanted) collect."""
    cb = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(cap.callback_address)
    assert cb(tensor, True, cap.user_data)
    assert cb(tensor, False, cap.user_data)


def test_padded_rows_are_read_and_edited_exactly(padded_view):
    view, read_base, values = padded_view
    cap = Capture()
    cap.set_sites([Site("l_out-0", 4)])
    cap.set_edits([Edit("l_out-0", "set", np.full((1, 4), -1.0, np.float32), np.array([-1, 0, 0], np.int32))])
    cap.begin(np.ones(3, bool), 8)
    _fire(cap, view)
    rows = cap.finish()
    want = values.copy()
    want[2:4, :4] = -1.0  # rows 1 and 2 of the view; the padding columns 4..5 keep their values
    np.testing.assert_array_equal(read_base(), want)
    # the capture ran after the edit and read all three padded rows
    np.testing.assert_array_equal(rows[0], want[1:4, :4])
    assert cap.edited_rows == (2,)
