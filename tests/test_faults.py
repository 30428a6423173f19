"""Faults lose nothing (issue #12, part 3).

Real `lcprobe run` processes on the tiny synthetic GGUF (real llama.cpp,
seconds per run). A run is SIGKILLed at several points (LCPROBE_FAULT makes
the process kill itself at an exact point: before the first item, between
groups, halfway through an item line, while summary.json is written; one kill
comes from outside, mid-decode), then `--resume` must give items.jsonl
byte-identical to an uninterrupted run. A full disk and a read-only output
directory (small tmpfs mounts; skipped where mount is not permitted) give one
line, keep every finished item, and resume once fixed. Ctrl-C once or twice
leaves a resumable directory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcprobe.results.lock import LOCK_NAME
from lcprobe.results.run import FAULT_ENV, read_items

N = 24
KILL_ARGS = ["-T", "calc", "--limit", str(N), "-b", "16", "-t", "1", "--quiet"]  # one item per group


def _cmd(model: Path, out: Path, args: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "lcprobe.cli", "run", "-m", str(model), *args, "-o", str(out)] + (
        ["--resume"] if resume else [])


def _run(model: Path, out: Path, args: list[str], resume: bool = False, fault: str | None = None,
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(_cmd(model, out, args, resume), capture_output=True, text=True, timeout=600, env=env)


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    s.pop("timing")
    return s


@pytest.fixture(scope="module")
def reference(synth_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "whole"
    proc = _run(synth_model[0], out, KILL_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert len(read_items(out / "items.jsonl")) == N
    return out


def _assert_resumes_identical(model: Path, out: Path, reference: Path, args: list[str] = KILL_ARGS) -> str:
    proc = _run(model, out, args, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "items.jsonl").read_bytes() == (reference / "items.jsonl").read_bytes()
    assert _summary(out) == _summary(reference)
    assert not (out / LOCK_NAME).exists()
    return proc.stderr


@pytest.mark.parametrize("fault, saved", [
    ("before-items", 0),
    ("after-group:3", 3),
    ("torn-line:4", 3),  # the 4th item is half on disk: dropped, never parsed
    ("summary", N),
])
def test_sigkill_at_a_point_then_resume_is_byte_identical(fault, saved, reference, synth_model, tmp_path):
    out = tmp_path / "killed"
    proc = _run(synth_model[0], out, KILL_ARGS, fault=fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    raw = (out / "items.jsonl").read_bytes()
    assert len(read_items(out / "items.jsonl")) == saved
    if fault.startswith("torn-line"):
        assert not raw.endswith(b"\n") and raw.count(b"\n") == saved
    if fault == "summary":
        assert not (out / "summary.json").exists() and (out / "summary.json.tmp").exists()
    err = _assert_resumes_identical(synth_model[0], out, reference)
    # the dead run's lock is taken over, and said so
    assert "took over the lock" in err and "no longer running" in err


def test_sigkill_from_outside_mid_run(reference, synth_model, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(synth_model[0], out, KILL_ARGS), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    items = out / "items.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if items.exists() and items.read_bytes().count(b"\n") >= 2:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 2 <= len(read_items(items)) < N
    _assert_resumes_identical(synth_model[0], out, reference)


def test_garbage_in_the_middle_is_refused_not_parsed(reference, synth_model, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    lines = (reference / "items.jsonl").read_bytes().splitlines(keepends=True)
    (out / "run.json").write_bytes((reference / "run.json").read_bytes())
    (out / "items.jsonl").write_bytes(lines[0] + b'{"id": "x", "logpro\n' + lines[1])
    proc = _run(synth_model[0], out, KILL_ARGS, resume=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "line 2" in proc.stderr


# --- full disk, read-only directory -------------------------------------------------------------

PAGE = 4096


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size; remount it with options; unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _remount(d: Path, options: str) -> None:
    proc = subprocess.run(["mount", "-o", f"remount,{options}", str(d)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


LONG = ["-T", "calc", "--limit", "60", "-b", "16", "-t", "1", "--quiet"]


def test_disk_full_keeps_finished_items_and_resumes(synth_model, tmp_path, small_fs):
    ref = tmp_path / "ref"
    proc = _run(synth_model[0], ref, LONG)
    assert proc.returncode == 0, proc.stderr
    items_bytes = (ref / "items.jsonl").stat().st_size
    log_pages = math.ceil((ref / "llama.log").stat().st_size / PAGE) + 1
    # room for llama.log, the lock, run.json (and its temporary) and about half the items
    item_pages = max(1, math.ceil(items_bytes / PAGE) // 2)
    fs = small_fs((log_pages + 3 + item_pages) * PAGE)
    out = fs / "run"
    proc = _run(synth_model[0], out, LONG)
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    assert err.count("\n") == 0 and err.startswith("lcprobe: error: ") and "No space left on device" in err, err
    assert "--resume" in err
    saved = read_items(out / "items.jsonl")
    assert 0 < len(saved) < 60
    raw = (out / "items.jsonl").read_bytes()
    assert raw.endswith(b"\n") and (ref / "items.jsonl").read_bytes().startswith(raw)  # cut back to whole items
    _remount(fs, "size=16m")  # space is back
    _assert_resumes_identical(synth_model[0], out, ref, LONG)


def test_read_only_directory_keeps_items_and_resumes(reference, synth_model, small_fs):
    fs = small_fs(4 << 20)
    out = fs / "run"
    fresh_ro = fs / "never"
    proc = _run(synth_model[0], out, KILL_ARGS, fault="after-group:3")
    assert proc.returncode == -signal.SIGKILL
    before = (out / "items.jsonl").read_bytes()
    _remount(fs, "ro")
    for target, resume in ((out, True), (fresh_ro, False)):
        proc = _run(synth_model[0], target, KILL_ARGS, resume=resume)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and err.count("\n") == 0 and "Read-only file system" in err, err
    assert (out / "items.jsonl").read_bytes() == before
    _remount(fs, "rw")
    _assert_resumes_identical(synth_model[0], out, reference)


# --- Ctrl-C --------------------------------------------------------------------------------------

SLOW = ["-T", "calc", "--limit", "40", "-b", "2", "-t", "1", "--quiet"]  # one choice per group: many groups


@pytest.fixture(scope="module")
def slow_reference(synth_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "slow"
    proc = _run(synth_model[0], out, SLOW)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_once_or_twice_is_resumable(presses, slow_reference, synth_model, tmp_path):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(synth_model[0], out, SLOW), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    items = out / "items.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if items.exists() and items.read_bytes().count(b"\n") >= 1:
            for _ in range(presses):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.002)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "resume with: " in err and "Traceback" not in err
    assert 0 < len(read_items(items)) < 40
    if presses == 1:  # stopped after the batch: the summary says so
        assert json.loads((out / "summary.json").read_text())["complete"] is False
    _assert_resumes_identical(synth_model[0], out, slow_reference, SLOW)
