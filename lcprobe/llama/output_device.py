"""Which ggml-backend device llama.cpp gives the model's output layer (where the device lens runs).

llama.cpp does not export the output layer's device, so this repeats its
rule (src/llama.cpp, llama_model_load_from_file_impl, and src/llama-model.cpp,
load_tensors, in the llama.cpp that llama-cpp-python 0.3.36 vendors):

- the model's devices: with ``--rpc``, the list lcprobe's engine hands over
  (this machine's GPUs, then every server's devices); otherwise llama.cpp's
  default, RPC devices already registered, then discrete GPUs, then
  integrated GPUs only when there is no discrete one;
- with ``-ngl N`` the last N of the n_layer blocks + 1 output layer are
  offloaded, so the output layer is on a device as soon as N >= 1 and there
  is a device, else on the CPU;
- offloaded layers are split over the devices by ``--tensor-split`` or, when
  none is given, by each device's free memory; the output layer, the last
  offloaded one, goes to the first device whose cumulative share exceeds
  (offloaded - 1) / offloaded: in practice the last device with a share.

Not repeated: llama.cpp skips a second backend's view of a GPU it already
lists (same PCI id); ``--split-mode`` other than layer is not an lcprobe
option. Free memory is read before llama.cpp loads the model, so a default
split over several GPUs is predicted from slightly different numbers.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2


@dataclass(frozen=True)
class OutputDevice:
    """A ggml-backend device (``handle`` is its ggml_backend_dev_t) and why it was chosen."""

    handle: int
    name: str
    description: str
    kind: str  # "CPU", "GPU", "IGPU" or "RPC"
    reason: str

    @property
    def is_cpu(self) -> bool:
        return self.kind == "CPU"


class _Registry:
    """ggml's device registry, from the ggml instance llama.cpp runs on (through libllama's handle).

    New function objects are made from the addresses so that the argtypes of
    llama_cpp's own bindings are never touched.
    """

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as llama

        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            addr = ctypes.cast(getattr(llama._lib, name), ctypes.c_void_p).value
            return ctypes.CFUNCTYPE(restype, *argtypes)(addr)

        self.dev_count = fn("ggml_backend_dev_count", sz)
        self.dev_get = fn("ggml_backend_dev_get", vp, sz)
        self.dev_type = fn("ggml_backend_dev_type", ctypes.c_int, vp)
        self.dev_name = fn("ggml_backend_dev_name", cp, vp)
        self.dev_description = fn("ggml_backend_dev_description", cp, vp)
        self.dev_memory = fn("ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz))
        self.dev_backend_reg = fn("ggml_backend_dev_backend_reg", vp, vp)
        self.reg_name = fn("ggml_backend_reg_name", cp, vp)
        self.dev_by_type = fn("ggml_backend_dev_by_type", vp, ctypes.c_int)

    def devices(self) -> list[int]:
        return [self.dev_get(i) for i in range(self.dev_count())]

    def kind(self, dev: int) -> str:
        t = self.dev_type(dev)
        if t == DEV_GPU and (self.reg_name(self.dev_backend_reg(dev)) or b"") == b"RPC":
            return "RPC"
        return {DEV_CPU: "CPU", DEV_GPU: "GPU", DEV_IGPU: "IGPU"}.get(t, f"type {t}")

    def free_memory(self, dev: int) -> int:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        if free.value == 0 and total.value == 0:  # llama.cpp then counts the host's memory
            cpu = self.dev_by_type(DEV_CPU)
            if cpu:
                self.dev_memory(cpu, ctypes.byref(free), ctypes.byref(total))
        return int(free.value)

    def describe(self, dev: int, reason: str) -> OutputDevice:
        return OutputDevice(int(dev), (self.dev_name(dev) or b"?").decode(errors="replace"),
                            (self.dev_description(dev) or b"").decode(errors="replace"), self.kind(dev), reason)


@functools.lru_cache(maxsize=1)
def _registry() -> _Registry:
    return _Registry()


def model_devices(rpc: Sequence[str] = ()) -> list[int]:
    """The devices llama.cpp will split offloaded layers over, in its order."""
    if rpc:
        from lcprobe.llama import rpc as rpc_mod

        return rpc_mod.local_gpu_devices() + rpc_mod.server_devices(tuple(rpc))
    reg = _registry()
    servers, gpus, igpus = [], [], []
    for dev in reg.devices():
        kind = reg.kind(dev)
        if kind == "RPC":
            servers.append(dev)
        elif kind == "GPU":
            gpus.append(dev)
        elif kind == "IGPU" and (not igpus or reg.dev_backend_reg(dev) == reg.dev_backend_reg(igpus[-1])):
            igpus.append(dev)
    return servers + gpus + (igpus if not gpus else [])


def output_index(n_layer: int, n_gpu_layers: int, shares: Sequence[float]) -> int | None:
    """Index into ``shares`` (one per device) of the output layer's device; None: the CPU."""
    n_dev = len(shares)
    if n_dev == 0 or n_gpu_layers <= 0:
        return None
    # float32, as llama.cpp computes the split points
    cum = np.cumsum(np.asarray(shares, np.float32), dtype=np.float32)
    if not cum[-1] > 0:
        return None
    cum = cum / cum[-1]
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    at = np.float32(n_layer - start) / np.float32(act)
    return min(int(np.searchsorted(cum, at, side="right")), n_dev - 1)


def output_device(n_layer: int, n_gpu_layers: int = 0, rpc: Sequence[str] = (),
                  tensor_split: Sequence[float] = ()) -> OutputDevice:
    """The device that will hold the output layer of an ``n_layer``-block model loaded this way."""
    reg = _registry()
    devices = model_devices(rpc) if n_gpu_layers > 0 else []
    if devices:
        given = list(tensor_split)[: len(devices)]
        given += [0.0] * (len(devices) - len(given))
        by_memory = not any(given)
        shares = [reg.free_memory(d) for d in devices] if by_memory else given
        i = output_index(n_layer, n_gpu_layers, shares)
        if i is not None:
            how = "free memory" if by_memory else "--tensor-split"
            return reg.describe(devices[i], f"-ngl {n_gpu_layers} offloads the output layer; device {i} of "
                                            f"{len(devices)} by {how}")
    cpu = reg.dev_by_type(DEV_CPU)
    if not cpu:
        from lcprobe.errors import LcprobeError

        raise LcprobeError("llama.cpp has no CPU device")
    why = "the output layer stays on the CPU" + ("" if devices or n_gpu_layers <= 0 else " (no GPU device)")
    return reg.describe(cpu, why)
