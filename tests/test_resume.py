"""Long runs survive: `lcprobe run` killed mid-run (SIGTERM) exits 130 with a resume
hint, `--resume` finishes it byte-identical to an uninterrupted run, two identical
runs write identical items.jsonl, and a run directory of another model or task is
refused. Real processes and the real SmolLM2; -b 64 gives many decode groups."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcprobe.results.run import read_items

pytestmark = pytest.mark.slow

N_ITEMS = 24
BASE = ["-T", "calc", "--limit", str(N_ITEMS), "-b", "64", "-t", "1", "--quiet"]


def _lcprobe() -> list[str]:
    script = Path(sys.executable).with_name("lcprobe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lcprobe.cli"]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_lcprobe() + args, capture_output=True, text=True, timeout=timeout)


def _summary_without_timing(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    s.pop("timing")
    return s


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "whole"
    proc = _run(["run", "-m", str(smollm2), *BASE, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert len(read_items(out / "items.jsonl")) == N_ITEMS
    return out


def test_two_identical_runs_write_identical_items(reference, smollm2, tmp_path):
    out = tmp_path / "again"
    proc = _run(["run", "-m", str(smollm2), *BASE, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert (out / "items.jsonl").read_bytes() == (reference / "items.jsonl").read_bytes()
    assert _summary_without_timing(out) == _summary_without_timing(reference)


def _start_and_kill(smollm2: Path, out: Path) -> tuple[int, str]:
    """Start a run, SIGTERM it once its first items are on disk; return (exit code, stderr)."""
    proc = subprocess.Popen(_lcprobe() + ["run", "-m", str(smollm2), *BASE, "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    items = out / "items.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if items.exists() and items.read_bytes().count(b"\n") >= 1:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_sigterm_then_resume_is_byte_identical(reference, smollm2, tmp_path):
    out = tmp_path / "killed"
    code, err = _start_and_kill(smollm2, out)
    assert code == 130, err
    n_saved = len(read_items(out / "items.jsonl"))
    assert 0 < n_saved < N_ITEMS, "the run finished before it could be interrupted"
    hint = next(line for line in err.splitlines() if line.startswith("resume with: "))
    command = shlex.split(hint[len("resume with: "):])
    assert command[-1] == "--resume" and "-o" in command
    assert json.loads((out / "summary.json").read_text())["complete"] is False

    proc = _run(command[1:])  # exactly what the hint says, minus the program name
    assert proc.returncode == 0, proc.stderr
    assert (out / "items.jsonl").read_bytes() == (reference / "items.jsonl").read_bytes()
    assert _summary_without_timing(out) == _summary_without_timing(reference)


def test_resume_refuses_another_task_or_model(reference, smollm2, synth_model, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = (out / "items.jsonl").read_bytes()
    other_task = _run(["run", "-m", str(smollm2), *BASE, "-T", "calc-add", "-o", str(out), "--resume"])
    assert other_task.returncode == 1
    assert other_task.stderr.strip().count("\n") == 0
    assert "different" in other_task.stderr and "task" in other_task.stderr
    other_model = _run(["run", "-m", str(synth_model[0]), *BASE, "-o", str(out), "--resume"])
    assert other_model.returncode == 1
    assert "different" in other_model.stderr and "model_sha256" in other_model.stderr
    assert (out / "items.jsonl").read_bytes() == before
