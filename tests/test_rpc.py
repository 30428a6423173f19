"""llama.cpp's RPC backend on loopback: two `lcprobe rpc-server` processes hold SmolLM2's
layers and the per-layer log-probs equal a local run's; a server killed mid-run gives a
one-line error, keeps the finished items, and --resume completes the run; a server of
another protocol version, or none at all, is refused in one line.

Needs the RPC build of llama-cpp-python (`make install` builds it); without it these
tests skip, except under `make test` (LCPROBE_REQUIRE_MODELS=1), where they fail."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lcprobe.llama import rpc
from lcprobe.results.run import read_items

if not rpc.available():
    _msg = "llama-cpp-python was built without the RPC backend (no libggml-rpc); run 'make install'"
    if os.environ.get("LCPROBE_REQUIRE_MODELS") == "1":
        pytest.fail(_msg, pytrace=False)
    pytest.skip(_msg, allow_module_level=True)

N_ITEMS = 8
BASE = ["-T", "calc", "--limit", str(N_ITEMS), "-b", "64", "-t", "1", "--quiet"]


def _lcprobe() -> list[str]:
    script = Path(sys.executable).with_name("lcprobe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lcprobe.cli"]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_lcprobe() + args, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `lcprobe rpc-server` process on 127.0.0.1, started and waited for."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log
        fh = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(_lcprobe() + ["rpc-server", "--port", str(self.port), "-t", "1"],
                                     stdout=fh, stderr=fh)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-server on {self.endpoint} did not start")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log = tmp_path_factory.mktemp("rpc") / "servers.log"
    pair = [Server(log=log), Server(log=log)]
    yield pair
    for s in pair:
        s.kill()


@pytest.fixture(scope="module")
def local_run(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rpc-local") / "local"
    proc = _run(["run", "-m", str(smollm2), *BASE, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out


def _logprobs(run_dir: Path) -> np.ndarray:
    return np.array([r["logprobs"] for r in read_items(run_dir / "items.jsonl")])


def _assert_same_numbers(a: Path, b: Path) -> float:
    x, y = _logprobs(a), _logprobs(b)
    assert x.shape == y.shape and x.shape[0] == N_ITEMS
    diff = float(np.abs(x - y).max())
    assert diff <= 1e-6, diff
    # the same winning choice for every item at every layer
    assert (x.argmax(axis=1) == y.argmax(axis=1)).all()
    return diff


def test_parse_endpoints():
    assert rpc.parse_endpoints("127.0.0.1:50052, h:1") == ("127.0.0.1:50052", "h:1")
    assert rpc.parse_endpoints(None) == ()
    for bad in ("h", "h:0", ":5", "h:x", "h:1,h:1"):
        with pytest.raises(rpc.RpcError):
            rpc.parse_endpoints(bad)


@pytest.mark.slow
def test_split_over_two_servers_equals_local(smollm2, servers, local_run, tmp_path):
    out = tmp_path / "split"
    eps = ",".join(s.endpoint for s in servers)
    proc = _run(["run", "-m", str(smollm2), *BASE, "--rpc", eps, "--tensor-split", "1,1", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    diff = _assert_same_numbers(local_run, out)
    print(f"max |diff| split vs local: {diff:.3g}")
    log = (out / "llama.log").read_text(errors="replace")
    # both servers' devices are the model's devices, and both hold blocks
    used = [line for line in log.splitlines() if "using device RPC" in line]
    assert all(any(s.endpoint in line for line in used) for s in servers), used
    # llama.cpp put each block where `lcprobe plan --rpc` says it goes
    from lcprobe.files.plan import device_split

    placed = {int(m.group(1)) + 1: int(m.group(2))
              for m in re.finditer(r"layer +(\d+) assigned to device RPC(\d)", log)}
    planned = {b: d for d, dev in enumerate(device_split(smollm2, 999, [1, 1])) for b in dev["layers"]}
    assert planned == {b: d for b, d in placed.items() if b <= 30} and set(planned.values()) == {0, 1}
    # and with the weights and KV cache it plans per server (llama.cpp's buffers, MiB)
    for dev, server in zip(device_split(smollm2, 999, [1, 1], n_batch=64), servers):
        for what, key in (("model", "weights"), ("KV", "kv_cache")):
            found = re.search(rf"\[{re.escape(server.endpoint)}\] {what} buffer size = +([\d.]+) MiB", log)
            mib = float(found.group(1))
            assert dev[key] == pytest.approx(mib * 2**20, rel=0.02), (server.endpoint, what)


@pytest.mark.slow
def test_server_dies_mid_run_then_resume(smollm2, local_run, tmp_path):
    a, b = Server(log=tmp_path / "a.log"), Server(log=tmp_path / "b.log")
    out = tmp_path / "dies"
    args = ["run", "-m", str(smollm2), *BASE, "--rpc", f"{a.endpoint},{b.endpoint}", "-o", str(out)]
    try:
        proc = subprocess.Popen(_lcprobe() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        items = out / "items.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if items.exists() and items.read_bytes().count(b"\n") >= 1:
                b.kill()
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
        assert b.proc.returncode is not None, "the run finished before the server could be killed"
        assert proc.returncode == 1, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lcprobe: error: ") and "--resume" in lines[0], err
        kept = read_items(items)
        assert 1 <= len(kept) < N_ITEMS
        b = Server(port=b.port, log=tmp_path / "b.log")
        proc2 = _run([*args, "--resume"])
        assert proc2.returncode == 0, proc2.stderr
        assert read_items(items)[: len(kept)] == kept
        _assert_same_numbers(local_run, out)
    finally:
        a.kill()
        b.kill()


class OldServer:
    """A peer answering HELLO as a server of protocol 6.1.0 would; nothing else."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(9)
                if len(head) == 9:
                    conn.recv(struct.unpack("<Q", head[1:])[0])
                    body = bytes([6, 1, 0, 0]) + bytes(24)
                    conn.sendall(struct.pack("<Q", len(body)) + body)


def test_another_protocol_version_is_refused(smollm2, tmp_path):
    old = OldServer()
    proc = _run(["run", "-m", str(smollm2), *BASE, "--rpc", old.endpoint, "-o", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("lcprobe: error: ")
    assert "6.1.0" in err and ".".join(map(str, rpc.PROTOCOL)) in err


def test_no_server_is_one_line(smollm2, tmp_path):
    proc = _run(["run", "-m", str(smollm2), *BASE, "--rpc", f"127.0.0.1:{_free_port()}", "-o", str(tmp_path / "o")],
                timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "cannot reach RPC server" in err


def test_rpc_server_warns_and_reports_its_version(servers):
    assert rpc.server_version(servers[0].endpoint) == rpc.PROTOCOL
    text = servers[0].log.read_text(errors="replace")
    assert "no authentication" in text and f"127.0.0.1:{servers[0].port}" in text


def test_plan_shows_memory_per_server(smollm2, servers):
    eps = ",".join(s.endpoint for s in servers)
    proc = _run(["plan", "-m", str(smollm2), "--rpc", eps, "--tensor-split", "2,1", "--json"], timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    plan = json.loads(proc.stdout)
    devs = plan["devices"]
    assert [d["endpoint"] for d in devs] == [s.endpoint for s in servers]
    assert sum(len(d["layers"]) for d in devs) == 30 and len(devs[0]["layers"]) == 21 and devs[1]["output"]
    assert all(d["weights"] > 0 and d["kv_cache"] > 0 for d in devs)
