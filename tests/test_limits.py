"""Sizes llama.cpp asserts on are checked before llama.cpp sees them (issue #12, part 1).

Each boundary goes through ``lcprobe run``: the smallest value that works runs
to the end, the value below it is refused with one line naming the flag and
that smallest value. The cases run in a child process, so a regression (a
llama.cpp GGML_ASSERT abort, exit 134) fails the test instead of killing pytest.
Most use the tiny synthetic GGUF (real llama.cpp, seconds); one runs SmolLM2
with the exact command from the issue.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lcprobe.results.run import read_items

# Run each argv through lcprobe.cli.main in one child process; report rc + stderr per case.
_DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys
    from lcprobe.cli import main
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
        out.append({"rc": rc, "stderr": err.getvalue()})
    print(json.dumps(out))
""")


def _run_cases(cases: list[list[str]], timeout: float = 600) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"child died with {proc.returncode} (llama.cpp abort?): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gpu_build() -> bool:
    from lcprobe.llama.engine import gpu_offload_supported

    return gpu_offload_supported()


# (flag values, message fragments: the flag and the smallest/largest value that works)
REFUSED = [
    (["-b", "0"], ["-b/--batch-size", "at least 2"]),
    (["-b", "1"], ["-b/--batch-size", "at least 2"]),
    (["-c", "0"], ["-c/--ctx-size", "at least 2"]),
    (["-c", "1"], ["-c/--ctx-size", "at least 2"]),
    (["-c", str((1 << 24) + 1)], ["-c/--ctx-size", f"at most {1 << 24}"]),
    (["-b", str((1 << 24) + 1)], ["-b/--batch-size", f"at most {1 << 24}"]),
    (["-t", "0"], ["-t/--threads", "at least 1"]),
    (["-t", "513"], ["-t/--threads", "512"]),
    (["-ngl", "-1"], ["-ngl/--n-gpu-layers", "negative"]),
]

WORKS = [["-b", "2"], ["-c", "2"], ["-c", "16"], ["-c", "48"], ["-b", "3", "-c", "2"], ["-ngl", "auto"],
         ["-ngl", "0"], ["-t", "1"]]


def test_boundaries_refused_with_flag_and_smallest_value(synth_model, tmp_path):
    model = str(synth_model[0])
    cases = [["run", "-m", model, "-T", "calc", "--limit", "2", "--quiet", "-o", str(tmp_path / f"r{i}"), *flags]
             for i, (flags, _) in enumerate(REFUSED)]
    if not _gpu_build():
        cases.append(["run", "-m", model, "-T", "calc", "--limit", "2", "--quiet", "-o", str(tmp_path / "g"),
                      "-ngl", "1"])
    results = _run_cases(cases)
    expected = [frags for _, frags in REFUSED] + ([["-ngl/--n-gpu-layers", "no GPU support", "-ngl 0"]]
                                                   if not _gpu_build() else [])
    for argv, frags, res in zip(cases, expected, results):
        lines = res["stderr"].strip().splitlines()
        assert res["rc"] == 1, (argv, res)
        assert len(lines) == 1 and lines[0].startswith("lcprobe: error: "), (argv, res)
        for frag in frags:
            assert frag in lines[0], (argv, frag, lines[0])
        assert not (tmp_path / Path(argv[argv.index("-o") + 1]).name / "items.jsonl").exists()


def test_smallest_values_run_to_the_end(synth_model, tmp_path):
    model = str(synth_model[0])
    cases = [["run", "-m", model, "-T", "calc", "--limit", "3", "-t", "1", "--quiet", "-o",
              str(tmp_path / f"w{i}"), *flags] for i, flags in enumerate(WORKS)]
    results = _run_cases(cases)
    for i, (flags, res) in enumerate(zip(WORKS, results)):
        assert res["rc"] == 0, (flags, res)
        items = read_items(tmp_path / f"w{i}" / "items.jsonl")
        assert [r["id"] for r in items] == [r["id"] for r in read_items(tmp_path / "w0" / "items.jsonl")]
        assert len(items) == 3


def test_bad_ngl_value_is_a_usage_error(synth_model):
    res = _run_cases([["run", "-m", str(synth_model[0]), "-ngl", "many"]])[0]
    assert res["rc"] == 2 and "'auto'" in res["stderr"]


def test_longest_prompt_against_the_context(synth_model, tmp_path):
    """A task whose prompts exceed the context: refused naming the -c that fits; that -c works."""
    words = " ".join(f"w{i}" for i in range(400))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{words} {i}?", "choices": ["a", "b"],
                                        "answer": 0}) + "\n" for i in range(2)))
    (tmp_path / "long.yaml").write_text(textwrap.dedent("""\
        name: long
        data: long.jsonl
        format: choices
        question_template: "Q: {question}\\nA:"
        answer_template: " {answer}"
        metric: acc
    """))
    model = str(synth_model[0])
    base = ["run", "-m", model, "-T", str(tmp_path / "long.yaml"), "-t", "1", "--quiet"]
    refused = _run_cases([[*base, "-c", "256", "-o", str(tmp_path / "a")]])[0]
    line = refused["stderr"].strip()
    assert refused["rc"] == 1 and "\n" not in line and "-c/--ctx-size" in line, refused
    need = int(line.split("use -c/--ctx-size ")[1].split()[0])
    assert need > 256
    ok = _run_cases([[*base, "-c", str(need), "-o", str(tmp_path / "b")]])[0]
    assert ok["rc"] == 0, ok
    assert len(read_items(tmp_path / "b" / "items.jsonl")) >= 1


@pytest.mark.slow
def test_issue_command_small_context_on_smollm2(smollm2, tmp_path):
    """`lcprobe run -m smollm2-135m -T calc -c 16` aborted in llama.cpp (exit 134); now it runs."""
    proc = subprocess.run([sys.executable, "-m", "lcprobe.cli", "run", "-m", str(smollm2), "-T", "calc", "-c", "16",
                           "--limit", "2", "-t", "1", "--quiet", "-o", str(tmp_path / "c16")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_items(tmp_path / "c16" / "items.jsonl")) == 2


def test_depth_skip_needs_a_batch_row_per_sequence(synth_model, tmp_path):
    """--skip decodes --positions + 1 sequences: -b below that aborted llama.cpp; now refused, and that -b runs."""
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 40)
    base = ["depth", "-m", str(synth_model[0]), "--text", str(text), "--skip", "1", "--positions", "4",
            "--max-tokens", "64", "-t", "1", "--quiet"]
    refused, ok = _run_cases([[*base, "-b", "4", "-o", str(tmp_path / "a")],
                              [*base, "-b", "5", "-o", str(tmp_path / "b")]])
    line = refused["stderr"].strip()
    assert refused["rc"] == 1 and "\n" not in line and "-b/--batch-size must be at least 5" in line, refused
    assert ok["rc"] == 0, ok
    assert (tmp_path / "b" / "skip.json").exists()
