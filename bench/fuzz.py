"""A seeded fault campaign: mutated GGUF files and task files through the real CLI.

Every case must end in a correct run (exit 0) or one `lcprobe: error: ...` line
with a non-zero exit: no signal, no traceback, no hang. GGUF cases mutate a tiny
synthetic 3-layer LLaMA model (header, metadata values, tensor infos, truncation
at every section boundary) and run `lcprobe info` (a sample also `lcprobe run`);
task cases mutate a YAML task and its JSONL data and run `lcprobe run -T FILE`.

    .venv/bin/python bench/fuzz.py --seed 1 --cases 2000 --kind all

By default each case runs in a child forked from a parent that has already
imported lcprobe (milliseconds per case instead of an interpreter start);
``--spawn`` runs each as `python -m lcprobe.cli ...` instead. Either way the
child's stdout/stderr go to files and its exit status is read by the parent, so
a signal or a hang in one case is seen as such and does not stop the campaign.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

OUTCOMES = ("ok", "error", "traceback", "signal", "timeout", "bad-exit")
GOOD = ("ok", "error")
# glibc's abort() and a segfault seen through a shell or a wrapper
CRASH_CODES = (134, 139)


@dataclass
class Case:
    kind: str  # "gguf" or "task"
    mutation: str
    argv: list[str]
    detail: str = ""


@dataclass
class Result:
    case: Case
    outcome: str
    returncode: int
    stderr_tail: str
    seconds: float


# ---------------------------------------------------------------- running


def classify(returncode: int, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode < 0 or returncode in CRASH_CODES:
        return "signal"
    if "Traceback" in stderr:
        return "traceback"
    if returncode == 0:
        return "ok"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("lcprobe: error: ")]
    # exactly one error line, and it is the last thing said
    if len(errors) == 1 and lines[-1] == errors[0]:
        return "error"
    return "bad-exit"


def _run_forked(argv: list[str], workdir: Path, timeout: float) -> tuple[int, str, bool]:
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's code
        rc = 70
        try:
            fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            # the parent's sys.stdout may not be fd 1 (pytest's capture): write where the CLI would
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            from lcprobe.cli.main import main

            rc = main(argv)
        except SystemExit as e:  # argparse exits
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - the traceback is what the campaign looks for
            import traceback

            traceback.print_exc()
            rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = 0
            break
        time.sleep(0.005)
    rc = -1 if timed_out else os.waitstatus_to_exitcode(status)
    return rc, err_path.read_text(errors="replace"), timed_out


def _run_spawned(argv: list[str], workdir: Path, timeout: float) -> tuple[int, str, bool]:
    cmd = [sys.executable, "-m", "lcprobe.cli", *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                           cwd=workdir)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return -1, err, True
    return p.returncode, p.stderr, False


def run_case(case: Case, workdir: Path, timeout: float, spawn: bool) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runner = _run_spawned if spawn else _run_forked
    rc, err, timed_out = runner(case.argv, workdir, timeout)
    outcome = classify(rc, err, timed_out)
    tail = "\n".join(err.strip().splitlines()[-6:])
    return Result(case, outcome, rc, tail, time.monotonic() - t0)


# ---------------------------------------------------------------- GGUF mutations


def _layout(path: Path) -> dict:
    """Byte offsets of every part of the header: kv fields, tensor infos, data start."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    base = reader.data.ctypes.data

    def off(a) -> int:
        return int(a.ctypes.data - base)

    fields = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        # parts: key_len, key, value_type, then the value (for arrays: item type, count, items)
        fields.append({"name": f.name, "start": f.offset,
                       "parts": [(off(p), p.nbytes) for p in f.parts],
                       "types": [int(t) for t in f.types], "data": list(f.data)})
    tensors = []
    for t in reader.tensors:
        parts = [(off(p), p.nbytes) for p in t.field.parts]
        # name_len, name, n_dims, dims, type, offset
        tensors.append({"name": t.name, "start": t.field.offset, "parts": parts,
                        "data_offset": int(t.data_offset), "n_bytes": int(t.n_bytes)})
    data_start = min(t["data_offset"] for t in tensors)
    end_infos = tensors[-1]["parts"][-1][0] + tensors[-1]["parts"][-1][1]
    return {"fields": fields, "tensors": tensors, "data_start": data_start, "end_infos": end_infos,
            "size": path.stat().st_size}


def _put(buf: bytearray, at: int, fmt: str, value) -> None:
    buf[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)


def gguf_mutations(base: bytes, layout: dict, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(mutation, detail, file bytes) for every systematic mutation plus random ones."""
    out: list[tuple[str, str, bytes]] = []

    def mutate(kind: str, detail: str, fn: Callable[[bytearray], None]) -> None:
        b = bytearray(base)
        fn(b)
        out.append((kind, detail, bytes(b)))

    # header
    mutate("header", "magic", lambda b: b.__setitem__(slice(0, 4), b"GGUX"))
    for v in (0, 1, 2, 4, 0xFFFFFFFF):
        mutate("header", f"version={v}", lambda b, v=v: _put(b, 4, "<I", v))
    n_t, n_kv = len(layout["tensors"]), len(layout["fields"]) + 0
    for v in (0, n_t - 1, n_t + 1, 2**40, 2**64 - 1):
        mutate("header", f"tensor_count={v}", lambda b, v=v: _put(b, 8, "<Q", v))
    for v in (0, n_kv - 1, n_kv + 1, 2**40, 2**64 - 1):
        mutate("header", f"kv_count={v}", lambda b, v=v: _put(b, 16, "<Q", v))

    # metadata values: every scalar and string length gets extreme values
    for f in layout["fields"]:
        parts = f["parts"]
        name = f["name"]
        mutate("metadata", f"{name}:key_len", lambda b, p=parts[0]: _put(b, p[0], "<Q", 2**62))
        mutate("metadata", f"{name}:value_type", lambda b, p=parts[2]: _put(b, p[0], "<I", rng.choice((13, 99, 2**31))))
        value_type = f["types"][0] if f["types"] else None
        if value_type == 9:  # array: item type, count
            mutate("metadata", f"{name}:array_type", lambda b, p=parts[3]: _put(b, p[0], "<I", 77))
            for v in (0, 2**40):
                mutate("metadata", f"{name}:array_len={v}", lambda b, p=parts[4], v=v: _put(b, p[0], "<Q", v))
            continue
        if value_type == 8:  # string: length, bytes
            mutate("metadata", f"{name}:str_len", lambda b, p=parts[3]: _put(b, p[0], "<Q", 2**50))
            mutate("metadata", f"{name}:str_bytes", lambda b, p=parts[4]: b.__setitem__(
                slice(p[0], p[0] + p[1]), bytes(rng.randrange(256) for _ in range(p[1]))))
            continue
        at, n = parts[3]
        for v in (0, 1, 2**(8 * n - 1) - 1, 2**(8 * n) - 1):
            mutate("metadata", f"{name}={v}", lambda b, at=at, n=n, v=v: b.__setitem__(
                slice(at, at + n), v.to_bytes(n, "little")))

    # tensor infos
    for t in layout["tensors"]:
        parts = t["parts"]
        name = t["name"]
        n_dims_at = parts[2][0]
        dims = parts[3:-2]
        type_at, off_at = parts[-2][0], parts[-1][0]
        for v in (0, 5, 255):
            mutate("tensor-info", f"{name}:n_dims={v}", lambda b, v=v: _put(b, n_dims_at, "<I", v))
        for v in (0, 3, 2**31, 2**63):
            mutate("tensor-info", f"{name}:dim0={v}", lambda b, v=v: _put(b, dims[0][0], "<Q", v))
        for v in (2, 8, 12, 39, 40, 99, 2**31):  # Q4_0, Q8_0, Q4_K, MXFP4, past the last, huge
            mutate("tensor-info", f"{name}:type={v}", lambda b, v=v: _put(b, type_at, "<I", v))
        own = t["data_offset"] - layout["data_start"]
        for v in (own + 1, own + 16, 2**40, 2**64 - 32):
            mutate("tensor-info", f"{name}:offset={v}", lambda b, v=v: _put(b, off_at, "<Q", v))

    # truncation at every section boundary (and one byte either side of a few)
    cuts = {4, 8, 16, 24, layout["end_infos"], layout["data_start"], layout["size"] - 1}
    cuts |= {f["start"] for f in layout["fields"]}
    cuts |= {t["start"] for t in layout["tensors"]}
    cuts |= {t["data_offset"] for t in layout["tensors"]}
    cuts |= {t["data_offset"] + t["n_bytes"] // 2 for t in layout["tensors"]}
    for c in sorted(cuts):
        if 0 < c < layout["size"]:
            out.append(("truncate", f"at={c}", base[:c]))
    out.append(("truncate", "empty", b""))
    return out


def random_gguf_mutation(base: bytes, layout: dict, rng: random.Random) -> tuple[str, str, bytes]:
    b = bytearray(base)
    lo, hi = 0, layout["data_start"]
    n = rng.choice((1, 2, 4, 8))
    at = rng.randrange(lo, hi - n)
    b[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
    return "random-bytes", f"{n}@{at}", bytes(b)


def gguf_cases(workdir: Path, base_model: Path, n: int, rng: random.Random, run_share: float) -> list[Case]:
    base = base_model.read_bytes()
    layout = _layout(base_model)
    workdir.mkdir(parents=True, exist_ok=True)
    muts = gguf_mutations(base, layout, rng)
    rng.shuffle(muts)
    while len(muts) < n:
        muts.append(random_gguf_mutation(base, layout, rng))
    cases = []
    for i, (kind, detail, data) in enumerate(muts[:n]):
        f = workdir / f"g{i:05d}.gguf"
        f.write_bytes(data)
        if rng.random() < run_share:
            argv = ["run", "-m", str(f), "-T", "calc", "--limit", "2", "-c", "64", "-t", "1",
                    "-o", str(workdir / f"g{i:05d}.out"), "--quiet"]
        else:
            argv = ["info", "-m", str(f)]
        cases.append(Case("gguf", kind, argv, detail))
    return cases


# ---------------------------------------------------------------- task mutations

BASE_YAML = {
    "name": "fuzz",
    "data": "data.jsonl",
    "format": "choices",
    "metric": "acc",
    "instruction": "Answer.",
    "question_template": "Q: {question}\nA:",
    "answer_template": " {answer}",
    "separator": "\n",
}
BASE_TF_YAML = dict(BASE_YAML, format="true-false", metric="mc1",
                    fewshot=[{"question": "one plus one", "answer": "two"}])
BASE_ROWS = [
    {"id": "a", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "answer": 0},
    {"id": "b", "question": "one plus two", "choices": ["three", "four", "five"], "answer": [0]},
    {"id": 3, "question": "the sky is", "choices": ["blue", "red"], "answer": 0},
]
BASE_TF_ROWS = [
    {"question": "the sky is", "truth_answer": ["blue"], "error": ["red"]},
    {"question": "snow is", "truth_answer": ["white"], "error": ["black", "green"]},
    {"question": "grass is", "truth_answer": ["green"], "error": ["red"]},
]

ODD_VALUES = [None, 0, -1, 2**70, 1.5, float("nan"), True, "", " ", [], {}, ["x"], {"a": 1}, "x" * 100_000,
              "\x00", "\ud800x", "é" * 10]
ODD_TEMPLATES = ["{nope}", "{0}", "{", "}", "{}", "{question!r}", "{question:>99999999}", "{question.x}",
                 "{question[0]}", "{answer}", "{{question}}", "{question:{answer}}", "%s", "",
                 "{question}" * 2000, "\x00{question}", "{id}{meta}"]
ODD_LINES = ["", "   ", "{", "[]", "1", "null", '"str"', '{"question": 1}', '{"question": "q"}',
             '{"question": "q", "choices": [], "answer": 0}', '{"question": "q", "choices": ["a"], "answer": 5}',
             '{"question": "q", "choices": ["a", "a"], "answer": [0, 0]}',
             '{"question": "q", "choices": [1, 2], "answer": 0}', '{"question": "q", "choices": ["a"], "answer": -1}',
             '{"question": "q", "choices": ["a"], "answer": true}', '{"question": "q", "choices": ["a"], "answer": 0.0}',
             '{"id": [1], "question": "q", "choices": ["a"], "answer": 0}',
             '{"id": "a", "question": "dup", "choices": ["a"], "answer": 0}',
             '{"question": "q", "choices": ["a"], "answer": 0, "meta": 3}',
             '{"question": "' + "long " * 20000 + '", "choices": ["a", "b"], "answer": 0}',
             '{"question": "q", "choices": ["' + "z" * 50000 + '", "b"], "answer": 0}',
             '{"question": "q", "choices": [""], "answer": 0}', '{"question": NaN}',
             '{"question": "q", "choices": ["a", "b"], "answer": 99999999999999999999999}']
ODD_TF_LINES = ['{"question": "q", "truth_answer": [], "error": []}', '{"question": "q", "truth_answer": "x"}',
                '{"question": "q", "truth_answer": [1], "error": ["b"]}', '{"question": "q", "error": ["b"]}',
                '{"question": "q", "truth_answer": [""], "error": [""]}']


def _dump_yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, allow_unicode=True, sort_keys=False)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def task_mutation(rng: random.Random) -> tuple[str, str, bytes, bytes]:
    """(mutation, detail, yaml bytes, data bytes)."""
    tf = rng.random() < 0.3
    y = dict(BASE_TF_YAML if tf else BASE_YAML)
    rows = [dict(r) for r in (BASE_TF_ROWS if tf else BASE_ROWS)]
    kind = rng.choice(("yaml-type", "yaml-missing", "yaml-extra", "template", "jsonl-line", "jsonl-field",
                       "encoding", "huge", "empty", "yaml-syntax", "valid"))
    detail = ""
    yaml_raw: bytes | None = None
    data_raw: bytes | None = None
    if kind == "yaml-type":
        key = rng.choice(list(y) + ["fewshot", "fewshot_from_data", "reader"])
        y[key] = rng.choice(ODD_VALUES)
        detail = f"{key}={str(y[key])[:30]!r}"
    elif kind == "yaml-missing":
        key = rng.choice(list(y))
        del y[key]
        detail = key
    elif kind == "yaml-extra":
        key = rng.choice(("nme", "Name", "", "metrics", "fewshot_from_data", "reader"))
        y[key] = rng.choice(("x", 3, -2, None, "pairs", "truthfulqa"))
        detail = f"{key}={y[key]!r}"
    elif kind == "template":
        key = rng.choice(("question_template", "answer_template", "instruction", "separator"))
        y[key] = rng.choice(ODD_TEMPLATES)
        detail = f"{key}={y[key][:30]!r}"
    elif kind == "jsonl-line":
        line = rng.choice(ODD_TF_LINES + ODD_LINES if tf else ODD_LINES)
        text = _jsonl(rows)
        lines = text.splitlines(keepends=True)
        lines.insert(rng.randrange(len(lines) + 1), line + "\n")
        data_raw = "".join(lines).encode()
        detail = line[:40]
    elif kind == "jsonl-field":
        r = rng.choice(rows)
        key = rng.choice(list(r) + ["extra"])
        r[key] = rng.choice(ODD_VALUES)
        detail = f"{key}={str(r[key])[:30]!r}"
    elif kind == "encoding":
        target = rng.choice(("yaml", "data"))
        enc = rng.choice(("utf-16", "utf-8-sig", "latin-1-bytes", "nul", "crlf", "garbage"))
        raw = (_dump_yaml(y) if target == "yaml" else _jsonl(rows))
        if enc == "utf-16":
            b = raw.encode("utf-16")
        elif enc == "utf-8-sig":
            b = raw.encode("utf-8-sig")
        elif enc == "latin-1-bytes":
            b = raw.replace("?", "\xe9?").encode("latin-1")
        elif enc == "nul":
            b = raw.encode().replace(b"\n", b"\x00\n", 1)
        elif enc == "crlf":
            b = raw.replace("\n", "\r\n").encode()
        else:
            b = bytes(rng.randrange(256) for _ in range(rng.choice((1, 64, 4096))))
        if target == "yaml":
            yaml_raw = b
        else:
            data_raw = b
        detail = f"{target}:{enc}"
    elif kind == "huge":
        what = rng.choice(("question", "choice", "instruction", "many-rows", "many-choices"))
        if what == "question":
            rows[0]["question"] = "the " * rng.choice((100, 100_000))
        elif what == "choice" and not tf:
            rows[0]["choices"][0] = "blue " * 5000
        elif what == "instruction":
            y["instruction"] = "Answer carefully. " * 10_000
        elif what == "many-rows":
            rows = [dict(rows[0], id=f"r{i}") if not tf else dict(rows[0]) for i in range(20_000)]
        elif not tf:
            rows[0]["choices"] = [f"c{i}" for i in range(2000)]
        detail = what
    elif kind == "empty":
        what = rng.choice(("yaml-file", "data-file", "question", "name", "choices", "blank-lines"))
        if what == "yaml-file":
            yaml_raw = b""
        elif what == "data-file":
            data_raw = b""
        elif what == "question":
            rows[1]["question"] = ""
        elif what == "name":
            y["name"] = ""
        elif what == "choices" and not tf:
            rows[2]["choices"] = []
        else:
            data_raw = b"\n\n" + _jsonl(rows).replace("\n", "\n\n").encode()
        detail = what
    elif kind == "yaml-syntax":
        raw = _dump_yaml(y)
        choice = rng.choice(("tab", "unclosed", "anchor-bomb", "list", "scalar", "dup-key", "tag"))
        if choice == "tab":
            raw = raw.replace("name:", "\tname:")
        elif choice == "unclosed":
            raw += 'instruction: "abc\n'
        elif choice == "anchor-bomb":
            raw = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" \
                  "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n" + raw
        elif choice == "list":
            raw = "- " + raw.replace("\n", "\n  ")
        elif choice == "scalar":
            raw = "just a string\n"
        elif choice == "dup-key":
            raw += "name: again\n"
        else:
            raw = "!!python/object/apply:os.system ['true']\n"
        yaml_raw = raw.encode()
        detail = choice
    return kind, detail, yaml_raw if yaml_raw is not None else _dump_yaml(y).encode(), \
        data_raw if data_raw is not None else _jsonl(rows).encode()


def task_cases(workdir: Path, model: Path, n: int, rng: random.Random) -> list[Case]:
    cases = []
    for i in range(n):
        kind, detail, yraw, draw = task_mutation(rng)
        d = workdir / f"t{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "task.yaml").write_bytes(yraw)
        (d / "data.jsonl").write_bytes(draw)
        argv = ["run", "-m", str(model), "-T", str(d / "task.yaml"), "--limit", "2", "-c", "64", "-t", "1",
                "-o", str(d / "out"), "--quiet"]
        cases.append(Case("task", kind, argv, detail))
    return cases


# ---------------------------------------------------------------- campaign


def synth_model(workdir: Path) -> Path:
    from synth import SynthSpec, write_llama_gguf

    path = workdir / "synth-f32.gguf"
    if not path.exists():
        write_llama_gguf(path, SynthSpec(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=1))
    return path


def _warm_up() -> None:
    """Import every command (and llama.cpp's bindings) once, so each forked case starts warm."""
    import importlib

    from lcprobe.cli.main import build_parser

    build_parser()
    importlib.import_module("lcprobe.llama.loader")


def campaign(workdir: Path, seed: int, cases: int, kind: str = "all", timeout: float = 60.0,
             spawn: bool = False, run_share: float = 0.1,
             progress: Callable[[Result], None] | None = None, model: Path | None = None) -> list[Result]:
    """Build and run ``cases`` cases (split between GGUF and task files for ``all``) on ``model``
    (a valid GGUF; by default a synthetic 3-layer LLaMA written into ``workdir``)."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model or synth_model(workdir)
    n_gguf = cases if kind == "gguf" else 0 if kind == "task" else cases - cases // 3
    todo = gguf_cases(workdir / "gguf", model, n_gguf, rng, run_share) if n_gguf else []
    todo += task_cases(workdir / "task", model, cases - n_gguf, rng)
    if not spawn:
        _warm_up()
    results = []
    for i, case in enumerate(todo):
        r = run_case(case, workdir / "runs" / f"{i:05d}", timeout, spawn)
        results.append(r)
        if progress:
            progress(r)
    return results


def summarize(results: list[Result]) -> str:
    by_mut: dict[tuple[str, str], Counter] = defaultdict(Counter)
    total: Counter = Counter()
    for r in results:
        by_mut[(r.case.kind, r.case.mutation)][r.outcome] += 1
        total[r.outcome] += 1
    lines = [f"{len(results)} cases: " + ", ".join(f"{o} {total[o]}" for o in OUTCOMES if total[o])]
    lines.append(f"{'kind':<5} {'mutation':<14} " + " ".join(f"{o:>9}" for o in OUTCOMES))
    for (k, m), c in sorted(by_mut.items()):
        lines.append(f"{k:<5} {m:<14} " + " ".join(f"{c[o]:>9}" for o in OUTCOMES))
    for r in results:
        if r.outcome not in GOOD:
            lines.append(f"BAD {r.outcome} rc={r.returncode} {r.case.kind}/{r.case.mutation} {r.case.detail}: "
                         f"{' '.join(r.case.argv[:3])}\n    " + r.stderr_tail.replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--kind", choices=("gguf", "task", "all"), default="all")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--run-share", type=float, default=0.1,
                    help="share of GGUF cases that also run `lcprobe run` (the rest run `lcprobe info`)")
    ap.add_argument("--spawn", action="store_true", help="a fresh `python -m lcprobe.cli` per case")
    ap.add_argument("--keep", metavar="DIR", help="write the cases here and keep them")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lcprobe-fuzz-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        results = campaign(work, args.seed, args.cases, args.kind, args.timeout, args.spawn, args.run_share)
    print(summarize(results))
    print(f"seed {args.seed}, {time.monotonic() - t0:.1f} s")
    return 0 if all(r.outcome in GOOD for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
