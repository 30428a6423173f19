"""Bind the C capture extension to the ggml library llama-cpp-python loaded.

The extension is compiled without ggml headers or a link-time dependency on
ggml; this module finds the exported functions in the libggml-base that
``llama_cpp`` already loaded and hands their addresses over. Doing it here,
at import, turns an incompatible llama-cpp-python into one clear message
instead of a crash inside a decode.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

from lcprobe.errors import LcprobeError

#: llama-cpp-python releases whose ggml ABI the capture was verified against.
SUPPORTED_LLAMA_CPP_PYTHON = ("0.3.36",)

#: ggml functions the capture calls; the extension binds them by name.
GGML_SYMBOLS = (
    "ggml_get_name",
    "ggml_nbytes",
    "ggml_backend_tensor_get",
    "ggml_backend_tensor_set",
    "ggml_fp16_to_fp32_row",
    "ggml_bf16_to_fp32_row",
)


class NativeError(LcprobeError):
    """The installed llama-cpp-python or the extension cannot be used."""


def _unsupported(detail: str) -> NativeError:
    versions = ", ".join(SUPPORTED_LLAMA_CPP_PYTHON)
    return NativeError(
        f"{detail}. lcprobe supports llama-cpp-python {versions}; "
        f"install it with: pip install llama-cpp-python=={SUPPORTED_LLAMA_CPP_PYTHON[-1]}"
    )


def _ggml_base_library(lib_dir: Path) -> Path:
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    preferred = lib_dir / names.get(sys.platform, "libggml-base.so")
    if preferred.exists():
        return preferred
    found = sorted(lib_dir.glob("*ggml-base*"))
    if not found:
        raise _unsupported(f"no libggml-base library in {lib_dir}")
    return found[0]


@functools.lru_cache(maxsize=1)
def ggml_addresses() -> dict[str, int]:
    """Addresses of :data:`GGML_SYMBOLS` in the loaded libggml-base, by name."""
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise _unsupported(f"llama_cpp cannot be imported ({exc})") from exc
    version = getattr(llama_cpp, "__version__", "unknown")
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    if not lib_dir.is_dir():
        raise _unsupported(f"llama-cpp-python {version} has no lib/ directory at {lib_dir}")
    # The same path llama_cpp loaded resolves to the same handle, so these are
    # the functions of the ggml instance that runs the model.
    lib = ctypes.CDLL(str(_ggml_base_library(lib_dir)))
    addresses: dict[str, int] = {}
    missing = []
    for name in GGML_SYMBOLS:
        try:
            addresses[name] = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
        except AttributeError:
            missing.append(name)
    if missing:
        raise _unsupported(
            f"llama-cpp-python {version} does not export {', '.join(missing)}"
        )
    if version not in SUPPORTED_LLAMA_CPP_PYTHON:
        # Symbols are present, so the capture will run; its per-tensor size
        # checks catch a changed tensor layout. Say so once, through warnings.
        import warnings

        warnings.warn(
            f"llama-cpp-python {version} is untested with lcprobe "
            f"(tested: {', '.join(SUPPORTED_LLAMA_CPP_PYTHON)})",
            RuntimeWarning,
            stacklevel=2,
        )
    return addresses


#: ggml functions the ggml lens backend calls (library, name); bound by name.
GGML_LENS_SYMBOLS = (
    ("base", "ggml_init"),
    ("base", "ggml_free"),
    ("base", "ggml_new_tensor_2d"),
    ("base", "ggml_get_data"),
    ("base", "ggml_nbytes"),
    ("base", "ggml_mul_mat"),
    ("base", "ggml_new_graph"),
    ("base", "ggml_build_forward_expand"),
    ("cpu", "ggml_graph_plan"),
    ("cpu", "ggml_graph_compute"),
    ("base", "ggml_tensor_overhead"),
    ("base", "ggml_graph_overhead"),
    ("base", "ggml_row_size"),
)


def _library(lib_dir: Path, kind: str) -> Path:
    if kind == "base":
        return _ggml_base_library(lib_dir)
    found = sorted(p for p in lib_dir.glob("*ggml-cpu*") if ".so" in p.name or p.suffix in (".dylib", ".dll"))
    if not found:
        raise _unsupported(f"no libggml-cpu library in {lib_dir}")
    return found[0]


@functools.lru_cache(maxsize=1)
def ggml_lens_addresses() -> dict[str, int]:
    """Addresses of :data:`GGML_LENS_SYMBOLS` by name (CPU backend, present in every build)."""
    import llama_cpp

    ggml_addresses()  # same checks and warnings as the capture
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    libs = {kind: ctypes.CDLL(str(_library(lib_dir, kind))) for kind in ("base", "cpu")}
    out: dict[str, int] = {}
    missing = []
    for kind, name in GGML_LENS_SYMBOLS:
        try:
            out[name] = ctypes.cast(getattr(libs[kind], name), ctypes.c_void_p).value or 0
        except AttributeError:
            missing.append(name)
    if missing:
        raise _unsupported(f"the ggml lens needs {', '.join(missing)}, which this llama-cpp-python lacks")
    return out


#: ggml functions the device lens backend calls (native/device_lens.c); bound by name.
DEVICE_LENS_SYMBOLS = (
    "ggml_init", "ggml_free", "ggml_new_tensor_2d", "ggml_mul_mat", "ggml_scale", "ggml_tanh",
    "ggml_soft_max", "ggml_argmax", "ggml_log", "ggml_get_rows", "ggml_sub", "ggml_reshape_2d",
    "ggml_reshape_3d", "ggml_new_graph_custom", "ggml_build_forward_expand", "ggml_set_input",
    "ggml_set_output", "ggml_tensor_overhead", "ggml_graph_overhead_custom", "ggml_row_size", "ggml_blck_size",
    "ggml_nbytes", "ggml_op_desc", "ggml_backend_dev_init", "ggml_backend_free", "ggml_backend_name",
    "ggml_backend_get_default_buffer_type", "ggml_backend_alloc_ctx_tensors", "ggml_backend_buffer_free",
    "ggml_backend_buffer_get_size", "ggml_backend_tensor_set", "ggml_backend_tensor_get", "ggml_gallocr_new",
    "ggml_gallocr_free", "ggml_gallocr_alloc_graph", "ggml_backend_graph_compute", "ggml_backend_supports_op",
    "ggml_backend_dev_backend_reg", "ggml_backend_reg_get_proc_address",
)


@functools.lru_cache(maxsize=1)
def device_lens_addresses() -> dict[str, int]:
    """Addresses of :data:`DEVICE_LENS_SYMBOLS` by name, in the ggml instance llama.cpp runs on.

    The wheel ships libggml-base.so and libggml-base.so.0 as two files, and a
    device handle (a GPU's, an RPC server's) is only valid with the registry
    and buffers of the copy that made it, so the symbols are looked up through
    libllama's own handle, which searches the libraries libllama loaded.
    """
    ggml_addresses()  # same version checks and warnings as the capture
    import llama_cpp.llama_cpp as llama

    out: dict[str, int] = {}
    missing = []
    for name in DEVICE_LENS_SYMBOLS:
        try:
            out[name] = ctypes.cast(getattr(llama._lib, name), ctypes.c_void_p).value or 0
        except AttributeError:
            missing.append(name)
    if missing:
        raise _unsupported(f"the device lens needs {', '.join(missing)}, which this llama-cpp-python lacks")
    return out


def extension():
    """The compiled ``lcprobe._capture`` module, with a useful error if absent."""
    try:
        from lcprobe import _capture
    except ImportError as exc:
        raise NativeError(
            f"lcprobe's C extension is not built ({exc}); reinstall with: pip install -e ."
        ) from exc
    return _capture
