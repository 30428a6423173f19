"""llama.cpp's RPC backend: other machines' devices as devices of the model, and serving ours.

Bound with ctypes from the ``libggml-rpc`` llama-cpp-python ships when built
with ``-DGGML_RPC=on`` (``make install`` builds that wheel). The client side
adds servers with ``ggml_backend_rpc_add_server`` and hands their devices to
the model through ``llama_model_params.devices``, exactly as llama.cpp's
``--rpc`` does; the server side is ``ggml_backend_rpc_start_server``, the
function llama.cpp's own ``rpc-server`` binary calls, so either server works.

The protocol has no authentication or encryption: a server must only ever
listen where nothing untrusted can reach it.

Before llama.cpp connects, each server gets a handshake of our own (a HELLO,
as llama.cpp sends it), because llama.cpp aborts the process on a refused
connection or a version mismatch; here they become one-line errors naming
both versions. A server that dies mid-run also makes llama.cpp abort (from
its dispatcher thread, no way back into the decode): :func:`exit_on_abort`
turns that into one line and exit status 1; the finished items are already
on disk, so ``--resume`` completes the run.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Sequence

from lcprobe.errors import LcprobeError

#: RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of ggml-rpc.h in the llama.cpp that llama-cpp-python 0.3.36
#: vendors (the library does not export it). A server is accepted when its major version is equal
#: and its minor version not newer, llama.cpp's own rule.
PROTOCOL = (7, 0, 0)
DEFAULT_PORT = 50052
_CMD_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: rpc_msg_hello_req is the caps, the response 4 bytes more
MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS
WARNING = ("the RPC protocol has no authentication or encryption: anyone who can reach this port can run "
           "code on this machine's backend and read its memory; never expose it to an untrusted network")


class RpcError(LcprobeError):
    """An RPC server cannot be used (unreachable, another protocol version, no RPC build)."""


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


def library_path() -> Path | None:
    """llama-cpp-python's libggml-rpc, or None when it was built without the RPC backend."""
    names = {"darwin": "libggml-rpc.dylib", "win32": "ggml-rpc.dll"}
    p = _lib_dir() / names.get(sys.platform, "libggml-rpc.so")
    if p.exists():
        return p
    found = sorted(_lib_dir().glob("*ggml-rpc*"))
    return found[0] if found else None


def available() -> bool:
    return library_path() is not None


def _missing() -> RpcError:
    return RpcError("this llama-cpp-python has no RPC backend (no libggml-rpc in its lib/); install the RPC "
                    "build with 'make install', or CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --no-cache-dir "
                    "--force-reinstall llama-cpp-python==0.3.36")


class _Ggml:
    """The ggml and RPC functions this module calls, from the very library instances llama.cpp runs on.

    A wheel stores libggml-base.so and libggml-base.so.0 as two files, so
    opening one by path can give a second copy with its own globals (its abort
    callback, its device registry). Symbols are therefore looked up through
    libllama's handle, which searches the libraries libllama itself uses; the
    RPC library's own handle is the fallback for a build that does not link it
    into libggml.
    """

    def __init__(self) -> None:
        path = library_path()
        if path is None:
            raise _missing()
        import llama_cpp.llama_cpp as llama

        self._handles = [llama._lib, ctypes.CDLL(str(path))]
        vp, sz, u32, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_char_p
        self.add_server = self._fn("ggml_backend_rpc_add_server", [cp], vp)
        self.get_device_memory = self._fn("ggml_backend_rpc_get_device_memory",
                                          [cp, u32, ctypes.POINTER(sz), ctypes.POINTER(sz)], None)
        self.start_server = self._fn("ggml_backend_rpc_start_server", [cp, cp, sz, sz, ctypes.POINTER(vp)], None)
        self.reg_dev_count = self._fn("ggml_backend_reg_dev_count", [vp], sz)
        self.reg_dev_get = self._fn("ggml_backend_reg_dev_get", [vp, sz], vp)
        self.dev_type = self._fn("ggml_backend_dev_type", [vp], ctypes.c_int)
        self.dev_count = self._fn("ggml_backend_dev_count", [], sz)
        self.dev_get = self._fn("ggml_backend_dev_get", [sz], vp)
        self.set_abort_callback = self._fn("ggml_set_abort_callback", [vp], vp)

    def _fn(self, name: str, argtypes: list, restype: object) -> Any:
        for h in self._handles:
            try:
                f = getattr(h, name)
            except AttributeError:
                continue
            f.argtypes, f.restype = argtypes, restype
            return f
        raise RpcError(f"llama-cpp-python's libraries do not export {name}")


@functools.lru_cache(maxsize=1)
def _ggml() -> _Ggml:
    return _Ggml()


# --- endpoints and the handshake ---------------------------------------------------------


def parse_endpoints(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a:50052,b:50052"`` (or a list of such) -> ``("a:50052", "b:50052")``, checked."""
    if not spec:
        return ()
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for ep in str(part).split(","):
            ep = ep.strip()
            if not ep:
                continue
            host, sep, port = ep.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise RpcError(f"--rpc {ep!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
            if ep in out:
                raise RpcError(f"--rpc names {ep} twice")
            out.append(ep)
    if len(out) > MAX_SERVERS:
        raise RpcError(f"--rpc names {len(out)} servers; llama.cpp takes at most {MAX_SERVERS}")
    return tuple(out)


def _version(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def server_version(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The protocol version the server at ``endpoint`` answers a HELLO with."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RpcError(f"cannot reach RPC server {endpoint}: {reason} (is 'lcprobe rpc-server' or llama.cpp's "
                       "rpc-server running there?)") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            head = _recv(sock, 8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            body = _recv(sock, min(size, 1 << 16)) if size else b""
        except OSError as exc:
            raise RpcError(f"RPC server {endpoint} failed during the handshake ({exc})") from None
    if len(body) < 3:
        raise RpcError(f"RPC server {endpoint} closed the connection during the handshake: it speaks another "
                       f"protocol version than this client's {_version(PROTOCOL)} (llama-cpp-python 0.3.36); "
                       "run a server built from the same llama.cpp")
    return body[0], body[1], body[2]


_checked: dict[str, tuple[int, int, int]] = {}


def check_server(endpoint: str) -> tuple[int, int, int]:
    """Refuse a server whose protocol this client cannot speak, naming both versions.

    Once per endpoint and process: a server serves one client at a time, so a
    second handshake while llama.cpp holds its connection would wait forever.
    """
    if endpoint in _checked:
        return _checked[endpoint]
    v = server_version(endpoint)
    if v[0] != PROTOCOL[0] or v[1] > PROTOCOL[1]:
        raise RpcError(f"RPC server {endpoint} speaks protocol {_version(v)}, this client "
                       f"{_version(PROTOCOL)} (llama-cpp-python 0.3.36): the major versions must match; "
                       "run a server built from the same llama.cpp")
    _checked[endpoint] = v
    return v


# --- the client: servers' devices for the model ---------------------------------------------


def server_devices(endpoints: Sequence[str]) -> list[int]:
    """Handles (ggml_backend_dev_t) of every device of every server, in the order given."""
    g = _ggml()
    devices: list[int] = []
    for ep in endpoints:
        check_server(ep)
        reg = g.add_server(ep.encode())
        n = g.reg_dev_count(reg) if reg else 0
        if not n:
            raise RpcError(f"RPC server {ep} offers no device")
        devices.extend(g.reg_dev_get(reg, i) for i in range(n))
    return devices


def local_gpu_devices() -> list[int]:
    """This machine's GPU devices (none on a CPU build): they keep their place before the servers'."""
    g = _ggml()
    out = []
    for i in range(g.dev_count()):
        dev = g.dev_get(i)
        if g.dev_type(dev) in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
            out.append(dev)
    return out


def device_array(devices: Sequence[int]) -> ctypes.Array:
    """A NULL-terminated ggml_backend_dev_t array for llama_model_params.devices (keep it alive)."""
    arr = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    return arr


def device_memory(endpoint: str) -> tuple[int, int]:
    """(free, total) bytes of the first device of the server at ``endpoint``."""
    g = _ggml()
    check_server(endpoint)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.get_device_memory(endpoint.encode(), 0, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


_abort_state: dict[str, object] = {}


def exit_on_abort(context: str) -> None:
    """Make a llama.cpp abort (e.g. a server gone mid-run) print one line and exit 1, not dump core.

    ggml calls abort() right after its abort callback, from whatever thread
    failed, so the callback cannot return into Python's error handling; it
    says what happened and ends the process. Items written so far are on disk.
    """
    g = _ggml()
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def _abort(message: bytes | None) -> None:
        text = (message or b"").decode("utf-8", "replace").strip().replace("\n", " ")
        text = text.split(": ", 1)[-1] if ".cpp:" in text.split(": ", 1)[0] else text
        sys.stderr.write(f"lcprobe: error: llama.cpp stopped: {text}; {context}\n")
        sys.stderr.flush()
        os._exit(1)

    cb = proto(_abort)
    _abort_state["cb"] = cb  # ctypes callbacks must outlive their registration
    g.set_abort_callback(ctypes.cast(cb, ctypes.c_void_p))


# --- the server -----------------------------------------------------------------------------


def serve(host: str, port: int, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's devices (its GPUs, else the CPU) until the process is killed.

    Blocks inside llama.cpp; the caller restores default signal handling first
    so Ctrl-C and SIGTERM end the process.
    """
    g = _ggml()
    devices = local_gpu_devices()
    if not devices:
        for i in range(g.dev_count()):
            dev = g.dev_get(i)
            if g.dev_type(dev) == 0:  # GGML_BACKEND_DEVICE_TYPE_CPU
                devices.append(dev)
                break
    if not devices:
        raise RpcError("no device to serve")
    arr = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"{host}:{port}".encode()
    cache = str(cache_dir).encode() if cache_dir else None
    g.start_server(endpoint, cache, n_threads, len(devices), arr)
