"""The public Python API (``lcprobe.load``) against the CLI and against llama.cpp itself.

What the issue's held-out scripts check, with the names they use: ``score``
against ``lcprobe run``'s items.jsonl for the same item run alone,
``logit_lens`` at the last layer against llama.cpp's own logits, ``run_task``
against the CLI's summary, and ``import lcprobe`` without llama_cpp.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import lcprobe
from lcprobe.cli import main

TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def model(smollm2):
    with lcprobe.load(str(smollm2), n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def ggml_model(smollm2):
    with lcprobe.load(str(smollm2), n_threads=2, lens_backend="ggml") as m:
        yield m


def test_import_loads_no_llama_cpp():
    code = (
        "import sys, lcprobe, lcprobe.results.run, lcprobe.results.suite, lcprobe.results.compare, "
        "lcprobe.report.make, lcprobe.sites\n"
        "from lcprobe.cli.main import build_parser\n"
        "build_parser()\n"
        "lcprobe.LcprobeError, lcprobe.read_items\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp' or m == 'lcprobe._capture'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_info_tokens_and_repr(model):
    info = model.info
    assert (info.arch, info.n_layer, info.n_embd, info.n_vocab, info.quant) == ("llama", 30, 576, 49152, "Q4_1")
    assert info.name == "smollm2-135m"  # the catalog name, not general.name
    assert Path(info.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = model.tokenize(TEXT)
    assert ids and all(isinstance(t, int) for t in ids)
    assert model.detokenize(ids) == TEXT
    assert "smollm2-135m" in repr(model)


def test_capture_shapes_sites_and_layers(model):
    acts = model.capture(TEXT, sites=["resid_post", "resid_mid", "resid_pre"])
    n = len(model.tokenize(TEXT))
    assert acts.tokens == model.tokenize(TEXT)
    assert acts["resid_post", 5].shape == (n, 576) and acts["resid_post", 5].dtype == np.float32
    assert acts.stack("resid_post").shape == (30, n, 576)
    np.testing.assert_array_equal(acts["resid_post", -1], acts["resid_post", 30])
    # resid_pre of block i+1 is block i's output; of block 1 the embedding
    np.testing.assert_array_equal(acts["resid_pre", 6], acts["resid_post", 5])
    assert not np.allclose(acts["resid_pre", 1], acts["resid_post", 1])
    assert not np.allclose(acts["resid_mid", 5], acts["resid_post", 5])
    sub = model.capture(TEXT, layers="1:3,-1")
    assert sub.layers("resid_post") == [1, 2, 3, 30]
    np.testing.assert_array_equal(sub["resid_post", 2], acts["resid_post", 2])
    with pytest.raises(lcprobe.LcprobeError, match="not captured"):
        sub["resid_post", 10]
    many = model.capture([TEXT, "Two plus two is"], layers=[-1])
    assert len(many) == 2 and many[0].tokens == acts.tokens
    np.testing.assert_array_equal(many[0]["resid_post", -1], acts["resid_post", -1])
    from_ids = model.capture(acts.tokens, layers=[-1])
    np.testing.assert_array_equal(from_ids["resid_post", -1], acts["resid_post", -1])


def test_capture_errors(model):
    with pytest.raises(lcprobe.LcprobeError, match="unknown site"):
        model.capture(TEXT, sites=["resid_nowhere"])
    with pytest.raises(lcprobe.LcprobeError, match="out of range"):
        model.capture(TEXT, layers=[31])
    with pytest.raises(lcprobe.PromptTooLongError, match="do not fit the context"):
        model.capture(" hello" * 3000)
    with pytest.raises(lcprobe.LcprobeError, match="vocabulary"):
        model.capture([1, 2, 10**7])


def test_logit_lens_ggml_is_llama_cpp_at_the_last_layer(ggml_model):
    acts = ggml_model.capture(TEXT, logits=True)
    lp = ggml_model.logit_lens(acts, positions=None, layers=[-1])
    z = acts.logits.astype(np.float64)
    ref = z - (z.max(-1, keepdims=True) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    assert lp.shape == (1, len(acts.tokens), 49152) and lp.dtype == np.float32
    assert np.abs(lp[0] - ref).max() < 1e-4
    assert (lp[0].argmax(-1) == z.argmax(-1)).all()


def test_logit_lens_and_top_tokens(model):
    acts = model.capture(TEXT)
    lp = model.logit_lens(acts, positions=[-1])
    assert lp.shape == (30, 1, 49152)
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=1e-3)
    top = model.top_tokens(lp[:, 0], k=5)
    assert len(top) == 30 and all(len(t) == 5 for t in top)
    assert top[-1][0][0].strip() == "Paris"  # the answer emerges at the top
    probs = [p for _, p in top[-1]]
    assert probs == sorted(probs, reverse=True)
    assert model.top_tokens(lp[-1, 0], k=2) == top[-1][:2]
    # numpy lens vs llama.cpp's logits at the last layer: same winner
    logits = model.logits(TEXT)
    assert int(np.argmax(logits[-1])) == int(np.argmax(lp[-1, 0]))


@pytest.mark.slow
def test_score_equals_a_cli_run_of_the_item_alone(model, smollm2, tmp_path):
    context = "Q: What is 2 + 2?\nA:"
    choices = [" 4", " 5", " 22"]
    scores = model.score(context, choices)
    assert scores.shape == (3, 30)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "choices": ["4", "5", "22"], "answer": 0}) + "\n")
    task = tmp_path / "one.yaml"
    task.write_text(yaml.safe_dump({
        "name": "one", "description": "one item", "data": "one.jsonl", "format": "choices", "metric": "acc",
        "instruction": "", "question_template": "Q: {question}\nA:", "answer_template": " {answer}",
        "separator": "\n",
    }))
    out = tmp_path / "run"
    assert main(["run", "-m", str(smollm2), "-T", str(task), "-t", "2", "-o", str(out), "--quiet"]) == 0
    rec = json.loads((out / "items.jsonl").read_text().splitlines()[0])
    assert np.abs(scores - np.array(rec["logprobs"])).max() <= 1e-4
    assert model.score(context, choices, layers="-1").shape == (3, 1)
    with pytest.raises(lcprobe.LcprobeError):
        model.score(context, " 4")


@pytest.mark.slow
def test_run_task_matches_the_cli(model, smollm2, tmp_path):
    res = model.run_task("capitals", limit=6, out=tmp_path / "api")
    assert main(["run", "-m", str(smollm2), "-T", "capitals", "--limit", "6", "-t", "2",
                 "-o", str(tmp_path / "cli"), "--quiet"]) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for key in ("layers", "best_layer", "best_value", "n_items", "metric", "task_hash", "sha256", "lens"):
        assert res.summary[key] == cli[key], key
    assert (tmp_path / "api" / "items.jsonl").read_bytes() == (tmp_path / "cli" / "items.jsonl").read_bytes()
    assert len(res.items) == 6 and res.items[0]["id"] == json.loads(
        (tmp_path / "cli" / "items.jsonl").read_text().splitlines()[0])["id"]
    # without out= the files go to a temporary directory; the results come back
    again = model.run_task("capitals", limit=6)
    assert again.summary["layers"] == cli["layers"]


def test_closed_model_and_bad_load(smollm2):
    m = lcprobe.load(str(smollm2), n_threads=1, lens_backend=None)
    m.close()
    m.close()  # twice is fine
    with pytest.raises(lcprobe.LcprobeError, match="closed"):
        m.capture(TEXT)
    with pytest.raises(lcprobe.LcprobeError, match="unknown lens"):
        lcprobe.load(str(smollm2), lens="tuned")
    with pytest.raises(lcprobe.ModelError):
        lcprobe.load("no-such-model-anywhere")


@pytest.mark.parametrize("script", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py")),
                         ids=lambda p: p.name)
def test_examples_run(script, smollm2):
    out = subprocess.run([sys.executable, str(script), "--model", str(smollm2)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
