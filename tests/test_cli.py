"""The CLI end to end on SmolLM2, `check` on both real models, and bad input.

Bad input must give one line on stderr starting with 'lcprobe: error:', a
non-zero exit, and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcprobe.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lcprobe.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("lcprobe: error:"), proc.stderr
    assert pattern.lower() in lines[-1].lower(), lines[-1]


@pytest.mark.slow
def test_run_end_to_end(smollm2, tmp_path):
    out = tmp_path / "calc"
    rc = main(["run", "-m", str(smollm2), "-T", "calc", "--limit", "12", "-t", "2", "-o", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 12 == summary["n_items"]
    for key in ("model", "sha256", "architecture", "quantization", "n_layer", "task", "task_hash", "lens",
                "layers", "metric", "best_layer", "n_items", "timing", "versions"):
        assert key in summary, key
    assert summary["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert summary["architecture"] == "llama" and summary["quantization"] == "Q4_1"
    assert [row["layer"] for row in summary["layers"]] == list(range(1, 31))
    assert set(summary["timing"]) >= {"seconds_total", "seconds_per_item", "tokens_decoded"}
    # Recompute every per-layer metric from items.jsonl independently.
    recs = [json.loads(ln) for ln in lines]
    for rec in recs:
        assert set(rec) >= {"id", "choices", "correct", "logprobs", "n_tokens"}
        assert len(rec["logprobs"]) == len(rec["choices"]) and all(len(lp) == 30 for lp in rec["logprobs"])
        assert all(v < 0 for lp in rec["logprobs"] for v in lp)
    acc = np.mean([[np.argmax(np.array(r["logprobs"])[:, li]) in r["correct"] for li in range(30)] for r in recs], axis=0)
    np.testing.assert_allclose([row["acc"] for row in summary["layers"]], acc, atol=1e-6)
    best = int(np.argmax(acc)) + 1
    assert summary["best_layer"] == best
    assert summary["breakdown"]["op"]  # calc adds the op/type/digits breakdown


@pytest.mark.slow
def test_raw_lens_and_layer_subset(smollm2, tmp_path):
    out = tmp_path / "raw"
    rc = main(["run", "-m", str(smollm2), "-T", "calc", "--limit", "4", "-t", "2", "--layers", "1:3,-1",
               "--lens", "raw", "-o", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["layer"] for row in summary["layers"]] == [1, 2, 3, 30]
    assert summary["lens"] == "raw"
    rec = json.loads((out / "items.jsonl").read_text().splitlines()[0])
    assert len(rec["logprobs"][0]) == 4
    # the last layer is normed in both lenses: it must equal a final-norm run's last layer
    out2 = tmp_path / "fn"
    assert main(["run", "-m", str(smollm2), "-T", "calc", "--limit", "4", "-t", "2", "--layers", "-1",
                 "-o", str(out2), "--quiet"]) == 0
    rec2 = json.loads((out2 / "items.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(np.array(rec["logprobs"])[:, -1], np.array(rec2["logprobs"])[:, 0], atol=1e-4)
    # raw lower layers differ from the normed ones (the head without the norm)
    assert not np.allclose(np.array(rec["logprobs"])[:, 0], np.array(rec["logprobs"])[:, -1])


@pytest.mark.parametrize("model_fixture", ["smollm2", "gemma3"])
def test_check_lens_against_llama_logits(model_fixture, request, capsys):
    path = request.getfixturevalue(model_fixture)
    rc = main(["check", "-m", str(path), "-t", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0, result
    assert result["decisive_argmax_agreement"] >= 0.99 and result["argmax_agreement"] >= 0.97
    assert result["near_ties"] < 0.1 * result["n_tokens"]
    assert result["max_abs_diff"] < 1.0  # activation quantization in llama.cpp's head matmul
    assert result["n_tokens"] > 100


def test_check_ggml_lens_reproduces_llama_logits(smollm2, capsys):
    # The ggml backend multiplies the stored Q8_0 head with llama.cpp's own
    # kernels, so it must match llama.cpp's logits almost exactly.
    rc = main(["check", "-m", str(smollm2), "-t", "2", "--json", "--lens-backend", "ggml"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["lens_backend"] == "ggml"
    assert result["argmax_agreement"] == 1.0
    assert result["max_abs_diff"] < 1e-3


def test_missing_model_file(tmp_path):
    assert_user_error(run_cli("run", "-m", str(tmp_path / "nope.gguf"), "-T", "calc"), "no such")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    assert_user_error(run_cli("check", "-m", str(bad)), "not a GGUF")


def test_truncated_gguf(tmp_path, smollm2):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as src:
        cut.write_bytes(src.read(3_000_000))
    assert_user_error(run_cli("run", "-m", str(cut), "-T", "calc"), "truncated")


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(run_cli("run", "-m", str(path), "-T", "calc"), "architecture 'gpt2' is not supported")


def test_unknown_catalog_name_suggests():
    assert_user_error(run_cli("run", "-m", "smollm2-135", "-T", "calc"), "smollm2-135m")


@pytest.mark.parametrize("yaml_text,pattern", [
    ("name: t\nformat: choices\nmetric: acc\nquestion_template: '{question}'\n", "answer_template"),
    ("name: t\nformat: essay\nmetric: acc\nquestion_template: '{question}'\nanswer_template: ' {answer}'\n", "format"),
    ("name: t\nformat: choices\nmetric: acc\nquestion_template: '{question} {nonsense}'\nanswer_template: ' {answer}'\n",
     "nonsense"),
    ("name: [unclosed\n", "yaml"),
])
def test_malformed_task_yaml(tmp_path, yaml_text, pattern, smollm2):
    (tmp_path / "d.jsonl").write_text('{"question": "2+2?", "choices": ["4", "5"], "answer": 0}\n')
    task = tmp_path / "task.yaml"
    task.write_text(yaml_text + ("data: d.jsonl\n" if "unclosed" not in yaml_text else ""))
    assert_user_error(run_cli("run", "-m", str(smollm2), "-T", str(task)), pattern)


def test_prompt_longer_than_context(tmp_path, smollm2):
    q = "why " * 3000
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": q, "choices": ["a", "b"], "answer": 0}) + "\n")
    task = tmp_path / "long.yaml"
    task.write_text("name: long\nformat: choices\nmetric: acc\ndata: d.jsonl\n"
                    "question_template: 'Q: {question}\\nA:'\nanswer_template: ' {answer}'\n")
    assert_user_error(run_cli("run", "-m", str(smollm2), "-T", str(task), "-c", "512", "-o", str(tmp_path / "o")),
                      "context")


def test_layer_spec_out_of_range(smollm2, tmp_path):
    assert_user_error(run_cli("run", "-m", str(smollm2), "-T", "calc", "--layers", "1:31", "-o", str(tmp_path)),
                      "out of range")


def test_help_explains():
    proc = run_cli("run", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--task", "--layers", "--lens", "--n-gpu-layers", "--ctx-size", "--batch-size",
                 "--resume", "--quiet", "items.jsonl"):
        assert flag in proc.stdout
