"""One writer per output directory (issue #12, part 2).

A child process holds a directory's lock; every command that writes results
is refused with one line naming the holder; a lock left by a killed process is
taken over with a note; two `lcprobe run` started together on one directory:
one is refused, the other's items are byte-identical to a lone run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lcprobe.cli import main
from lcprobe.results.lock import LOCK_NAME, DirectoryLockedError, lock_dir, lock_holder
from lcprobe.results.run import read_items

_HOLDER = textwrap.dedent("""
    import sys, time
    from lcprobe.results.lock import lock_dir
    with lock_dir(sys.argv[1], "holder-command --xyz"):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a directory; yields (dir, Popen)."""
    procs = []

    def start(directory: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_writer_refused_naming_the_holder(holder, tmp_path):
    d = tmp_path / "out"
    proc = holder(d)
    with pytest.raises(DirectoryLockedError) as exc:
        with lock_dir(d, "me"):
            pass
    msg = str(exc.value)
    assert f"pid {proc.pid}" in msg and "holder-command --xyz" in msg and "\n" not in msg
    assert lock_holder(d)["pid"] == proc.pid


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    d = tmp_path / "out"
    with lock_dir(d, "outer"):
        with lock_dir(d, "inner"):
            assert lock_holder(d) is None or lock_holder(d)["pid"] == os.getpid()
        assert (d / LOCK_NAME).exists()  # still held by the outer block
    assert not (d / LOCK_NAME).exists()
    assert lock_holder(d) is None
    with lock_dir(d, "again"):
        pass


def test_stale_lock_of_a_killed_process_is_taken_over(holder, tmp_path):
    d = tmp_path / "out"
    proc = holder(d)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == proc.pid  # the record outlives its holder
    notes: list[str] = []
    with lock_dir(d, "next", on_stale=notes.append):
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "no longer running" in notes[0]


def _synth_args(model: Path) -> list[str]:
    return ["-m", str(model), "-t", "1", "--quiet"]


@pytest.mark.parametrize("command", ["run", "suite", "compare", "depth", "depth-skip"])
def test_every_writing_command_refuses_a_locked_directory(command, holder, synth_model, tmp_path, monkeypatch,
                                                          capsys):
    model = synth_model[0]
    d = tmp_path / command
    holder(d)
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 50)
    argv = {
        "run": ["run", *_synth_args(model), "-T", "calc", "--limit", "2", "-o", str(d)],
        "suite": ["suite", *_synth_args(model), "-T", "calc", "--limit", "2", "-o", str(d)],
        "compare": ["compare", "-m", str(model), "-m", str(model), "-t", "1", "--quiet", "-T", "calc",
                    "--limit", "2", "-o", str(d)],
        "depth": ["depth", *_synth_args(model), "--text", str(text), "--max-tokens", "64", "-o", str(d)],
        "depth-skip": ["depth", *_synth_args(model), "--text", str(text), "--skip", "1", "--max-tokens", "64",
                       "-o", str(d)],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcprobe: error: ") and "holder-command --xyz" in err[0], err
    assert not (d / "items.jsonl").exists() and not (d / "depth.json").exists()


def test_two_concurrent_runs_one_refused_other_identical_to_lone_run(synth_model, tmp_path):
    base = [sys.executable, "-m", "lcprobe.cli", "run", "-m", str(synth_model[0]), "-T", "calc", "--limit", "40",
            "-b", "2", "-t", "1", "--quiet"]
    lone = subprocess.run([*base, "-o", str(tmp_path / "lone")], capture_output=True, text=True, timeout=600)
    assert lone.returncode == 0, lone.stderr
    shared = tmp_path / "shared"
    procs = [subprocess.Popen([*base, "-o", str(shared)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 1).strip()
    winner = next(p for p in procs if p.returncode == 0)
    assert loser.count("\n") == 0 and f"pid {winner.pid}" in loser and "being written by" in loser, loser
    assert (shared / "items.jsonl").read_bytes() == (tmp_path / "lone" / "items.jsonl").read_bytes()
    assert json.loads((shared / "summary.json").read_text())["n_items"] == 40
    assert len({r["id"] for r in read_items(shared / "items.jsonl")}) == 40
    assert not (shared / LOCK_NAME).exists()
