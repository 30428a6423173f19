"""``lcprobe steer``: directions from contrastive pairs as llama.cpp's cvector-generator makes them,
files llama.cpp loads, and the per-scale evaluation."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

import lcprobe
from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.interventions.cvec import ControlVector
from lcprobe.studies.steer import Pair, direction, make_vector, parse_scales, read_pairs

PAIRS = [
    Pair("I love this, it is wonderful and", "I hate this, it is terrible and"),
    Pair("What a great day, I feel so happy", "What an awful day, I feel so sad"),
    Pair("The movie was brilliant", "The movie was dreadful"),
]


def _write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps({"positive": p.positive, "negative": p.negative}) + "\n" for p in pairs))
    return path


def test_direction_methods():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(32)
    d = np.outer(rng.uniform(0.5, 2.0, 50), u) + 1e-3 * rng.standard_normal((50, 32))
    for method in ("mean", "pca"):
        v = direction(d, method)
        assert abs(np.linalg.norm(v) - 1) < 1e-6
        assert float(v @ u / np.linalg.norm(u)) > 0.999  # along the differences, pointing positive
    assert np.allclose(direction(-d, "pca"), -direction(d, "pca"), atol=1e-6)
    with pytest.raises(LcprobeError, match="identical"):
        direction(np.zeros((3, 4)), "mean")


def test_pairs_and_scales_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"positive": "a"}\n')
    with pytest.raises(LcprobeError, match="bad.jsonl:1"):
        read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(LcprobeError, match="no pairs file"):
        read_pairs(tmp_path / "none.jsonl")
    assert len(read_pairs(_write_pairs(tmp_path / "p.jsonl"))) == 3
    assert parse_scales("-4,-2,0,2,4") == [-4, -2, 0, 2, 4]
    for bad in ("x", "", "1,nan"):
        with pytest.raises(LcprobeError):
            parse_scales(bad)


@pytest.mark.slow
def test_make_vector_is_the_mean_difference(smollm2, tmp_path):
    with lcprobe.load(str(smollm2), n_threads=2, lens_backend=None) as m:
        cv = make_vector(m.loaded.engine, PAIRS, "mean")
        n = m.info.n_layer
        assert list(cv.directions) == list(range(1, n))
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in cv.directions.values())
        # by hand, through the public capture: direction.K from block K-1's output (0-based), padded with " "
        pad = m.tokenize(" ", add_special=False)[-1]
        for K in (1, 14, n - 1):
            rows = []
            for p in PAIRS:
                a, b = m.tokenize(p.positive), m.tokenize(p.negative)
                t = max(len(a), len(b))
                ha = m.capture(a + [pad] * (t - len(a)), layers=[K])["resid_post", K]
                hb = m.capture(b + [pad] * (t - len(b)), layers=[K])["resid_post", K]
                d = ha - hb
                rows.append(d[np.abs(d).max(axis=1) > 1e-6])
            mean = np.concatenate(rows).mean(axis=0)
            assert np.abs(cv.directions[K] - mean / np.linalg.norm(mean)).max() < 1e-5, K
        pca = make_vector(m.loaded.engine, PAIRS, "pca", layers=[5, 20])
        assert sorted(pca.layers()) == [5, 20]
        assert float(pca.directions[4] @ cv.directions[4]) > 0.3  # same sign convention as the mean
        with pytest.raises(LcprobeError, match="layers 2..N"):
            make_vector(m.loaded.engine, PAIRS, "mean", layers=[1, 2])


@pytest.mark.slow
def test_steer_cli_make_and_eval(smollm2, tmp_path, capsys):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    vec = tmp_path / "vec.gguf"
    assert main(["steer", "make", "-m", str(smollm2), "-t", "2", "--pairs", str(pairs), "-o", str(vec),
                 "--quiet"]) == 0
    cv = ControlVector.load(vec)
    assert cv.n_embd == 576 and list(cv.directions) == list(range(1, 30))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("I think that\n")
    out = tmp_path / "steer"
    assert main(["steer", "eval", "-m", str(smollm2), "-t", "2", "--vector", str(vec), "--scales", "-8,0,8",
                 "--layers", "10:20", "-T", "calc", "--limit", "6", "--prompts", str(prompts), "-n", "6",
                 "-o", str(out), "--quiet"]) == 0
    doc = json.loads((out / "steer.json").read_text())
    assert doc["scales"] == [-8, 0, 8] and doc["vector"]["added_to_layers"] == list(range(10, 21))
    rows = {r["scale"]: r for r in doc["rows"]}
    zero = rows[0]
    assert zero["kl"] == 0.0 and all(t["b"] == t["c"] == 0 and t["p"] == 1.0 for t in zero["mcnemar_vs_0"])
    assert rows[8]["kl"] > 0.01 and rows[-8]["kl"] > 0.01
    assert len(rows[8]["layers"]) == 30 and len(rows[8]["mcnemar_vs_0"]) == 30
    conts = {s: r["continuations"][0]["continuation"] for s, r in rows.items()}
    assert conts[8] != conts[0] or conts[-8] != conts[0]
    for s in (-8, 0, 8):
        assert (out / f"scale_{s}" / "summary.json").is_file()
    from lcprobe.report.make import make_report

    figs = make_report(out).figures
    assert any(p.name == "steer.png" and p.stat().st_size > 10_000 for p in figs)
    # errors are one line
    capsys.readouterr()
    assert main(["steer", "eval", "-m", str(smollm2), "--vector", str(tmp_path / "no.gguf"), "-o",
                 str(out)]) == 1
    assert "lcprobe: error: no control vector" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_tools_and_lcprobe_read_each_others_vectors(smollm2, tmp_path):
    """cvector-generator's file loads in lcprobe and matches lcprobe's own mean vector; lcprobe's file
    changes llama.cpp's perplexity through --control-vector, and scale 0 leaves it unchanged."""
    from llama_tools import build_tool

    gen = build_tool("llama-cvector-generator")
    (tmp_path / "pos.txt").write_text("".join(p.positive + "\n" for p in PAIRS))
    (tmp_path / "neg.txt").write_text("".join(p.negative + "\n" for p in PAIRS))
    theirs_path = tmp_path / "theirs.gguf"
    done = subprocess.run([str(gen), "-m", str(smollm2), "--positive-file", str(tmp_path / "pos.txt"),
                           "--negative-file", str(tmp_path / "neg.txt"), "--method", "mean", "-t", "2",
                           "-o", str(theirs_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = ControlVector.load(theirs_path)
    with lcprobe.load(str(smollm2), n_threads=2, lens_backend=None) as m:
        ours = make_vector(m.loaded.engine, PAIRS, "mean")
    assert list(theirs.directions) == list(ours.directions)
    cos = [float(theirs.directions[k] @ ours.directions[k]) for k in ours.directions]
    assert min(cos) > 0.99, cos
    print(f"cosine(cvector-generator, lcprobe) per layer: min {min(cos):.5f}, median {np.median(cos):.5f}")

    ppl = build_tool("llama-perplexity")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(p.positive + ". " + p.negative + "." for p in PAIRS) * 12)
    ours_path = ours.scaled(4.0).save(tmp_path / "ours.gguf")

    def perplexity(*extra: str) -> str:
        r = subprocess.run([str(ppl), "-m", str(smollm2), "-f", str(text), "-c", "128", "--chunks", "2", "-t", "2",
                            "-b", "128", *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        found = re.findall(r"Final estimate: PPL = ([\d.]+ \+/- [\d.]+)", r.stdout + r.stderr)
        assert found, (r.stdout + r.stderr)[-2000:]
        return found[-1]

    plain = perplexity()
    steered = perplexity("--control-vector", str(ours_path))
    print("llama-perplexity:", plain, "| with lcprobe's vector x4:", steered)
    assert steered != plain
    assert perplexity("--control-vector-scaled", f"{ours_path}:0") == plain
