"""The fault campaign (issue #12, part 5): mutated GGUF and task files through the real CLI.

`bench/fuzz.py` mutates the synthetic 3-layer LLaMA GGUF (header, metadata
values, tensor infos, truncation at every section boundary) and YAML/JSONL task
files, and runs each case as a real `lcprobe info` / `lcprobe run` (real
llama.cpp) in its own child process. Every case must end in exit 0 or one
`lcprobe: error:` line with a non-zero exit: no traceback, no signal, no hang.
`.venv/bin/python bench/fuzz.py --seed N --cases 5000` runs a longer campaign.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fuzz  # noqa: E402

SEED = int(os.environ.get("LCPROBE_FUZZ_SEED", "12"))


@pytest.mark.slow
def test_fault_campaign(synth_model, tmp_path):
    results = fuzz.campaign(tmp_path, SEED, 320, "all", timeout=60.0, run_share=0.1, model=synth_model[0])
    assert len(results) >= 300
    outcomes = Counter(r.outcome for r in results)
    bad = [r for r in results if r.outcome not in fuzz.GOOD]
    assert not bad, fuzz.summarize(results)
    kinds = Counter((r.case.kind, r.outcome) for r in results)
    # the campaign must exercise both kinds of file, both verdicts, and the real model
    assert kinds["gguf", "error"] > 100 and kinds["task", "error"] > 20 and kinds["task", "ok"] > 10, outcomes
    assert any(r.case.argv[0] == "run" and r.outcome == "ok" for r in results if r.case.kind == "gguf")
    mutations = {r.case.mutation for r in results}
    assert {"header", "metadata", "tensor-info", "truncate"} <= mutations


def test_classify():
    assert fuzz.classify(0, "", False) == "ok"
    assert fuzz.classify(1, "lcprobe: error: tensor x ends past the end of the file\n", False) == "error"
    assert fuzz.classify(1, "Traceback (most recent call last):\nValueError: x\n", False) == "traceback"
    assert fuzz.classify(1, "lcprobe: error: a\nlcprobe: error: b\n", False) == "bad-exit"
    assert fuzz.classify(1, "", False) == "bad-exit"
    assert fuzz.classify(-11, "", False) == "signal"
    assert fuzz.classify(134, "", False) == "signal"
    assert fuzz.classify(-1, "", True) == "timeout"


def test_truncated_tensor_message(synth_model, tmp_path):
    """A file cut inside the tensor data names the tensor and the likely cause."""
    from lcprobe.errors import ModelError
    from lcprobe.files.modelfile import read_model_info

    data = synth_model[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=r"tensor \S+ ends past the end of the file .*truncated download\?"):
        read_model_info(cut)


def _patched(src: Path, dst: Path, key: str, part: int, value: bytes) -> Path:
    """``src`` with part ``part`` of metadata ``key`` (3: a scalar's value, 4: an array's length)
    overwritten by ``value``."""
    field = next(f for f in fuzz._layout(src)["fields"] if f["name"] == key)
    data = bytearray(src.read_bytes())
    at = field["parts"][part][0]
    data[at:at + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("key, part, value, message", [
    # found by the campaign: llama.cpp aborted (SIGABRT) on a NaN epsilon
    ("llama.attention.layer_norm_rms_epsilon", 3, b"\xff\xff\xff\xff", "layer norm epsilon = nan"),
    # a zero RoPE base gave NaN scores and a traceback in the metrics
    ("llama.rope.freq_base", 3, b"\0\0\0\0", "llama.rope.freq_base = 0.0"),
    # a ZeroDivisionError in the memory plan
    ("llama.attention.head_count", 3, b"\0\0\0\0", "head_count = 0 is not a count"),
    # an array length of 2**40 made gguf-py loop for hours
    ("tokenizer.ggml.scores", 4, (2**40).to_bytes(8, "little"), "truncated download"),
])
def test_header_faults_found_by_the_campaign(synth_model, tmp_path, key, part, value, message):
    from lcprobe.errors import ModelError
    from lcprobe.files.modelfile import read_model_info

    path = _patched(synth_model[0], tmp_path / "bad.gguf", key, part, value)
    with pytest.raises(ModelError, match=message):
        read_model_info(path)


@pytest.mark.parametrize("yaml_text, data_line, message", [
    ('question_template: "{question:>99999999}"\n', None, "pads past 1000 characters"),
    ('question_template: "Q: {question}"\ninstruction: "\\ud800"\n', None, "unpaired surrogate"),
    ('question_template: "Q: {question}"\n', '{"question": "a\\ud800", "choices": ["x"], "answer": 0}',
     "data.jsonl:1: text holds an unpaired surrogate"),
])
def test_task_faults_found_by_the_campaign(tmp_path, yaml_text, data_line, message):
    from lcprobe.errors import TaskError
    from lcprobe.tasks.task import load_task

    (tmp_path / "data.jsonl").write_text(
        (data_line or '{"question": "q", "choices": ["x", "y"], "answer": 0}') + "\n")
    task_file = tmp_path / "t.yaml"
    task_file.write_text("name: t\ndata: data.jsonl\nformat: choices\nmetric: acc\n"
                         "answer_template: \" {answer}\"\n" + yaml_text)
    with pytest.raises(TaskError, match=message):
        load_task(str(task_file)).items()
