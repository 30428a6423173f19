"""``lcprobe patch``: the batched causal-tracing sweep against single patched runs through the API."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lcprobe
from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.studies.patching import run_patching

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


@pytest.fixture(scope="module")
def smol(smollm2):
    # the single patched runs: the public API, f32 KV cache, no flash attention
    with lcprobe.load(str(smollm2), n_threads=2, lens_backend=None, kv_type="f32", flash_attn="off") as m:
        yield m


def _sweep_options(path, runs_per_round: int):
    """What `lcprobe patch` loads: the above, plus a KV stream per run and no weight repacking."""
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.llama.loader import LoadOptions
    from lcprobe.studies.patching import sweep_options

    # one thread: a sweep with a stream per run syncs threads per stream and head, which a shared
    # machine makes slow; the numbers do not depend on it
    return LoadOptions(n_threads=1, lens_backend=None, **sweep_options(read_model_info(path), CORRUPT, runs_per_round))


@pytest.fixture(scope="module")
def sweep_engine(smollm2):
    from lcprobe.llama.loader import open_model

    with open_model(smollm2, _sweep_options(smollm2, 30)) as lm:
        yield lm.engine


@pytest.mark.slow
def test_sweep_matches_single_patched_runs(smol, sweep_engine):
    eng = sweep_engine
    res = run_patching(eng, CLEAN, CORRUPT, " Paris", " Rome", sites=("resid_post", "resid_mid"), layers=[1, 8, 30])
    n = len(res.tokens)
    assert res.sites["resid_post"].shape == (3, n) and res.n_runs == 2 * 3 * n
    assert res.clean_diff > 0 > res.corrupt_diff
    # batching many sequences into one decode changes nothing
    assert res.unpatched_batched_diff == res.corrupt_diff
    # the final residual at the last position decides the logits: fully restored
    assert res.sites["resid_post"][2, n - 1] == pytest.approx(1.0, abs=1e-4)
    # a position both prompts share (causal: identical rows) restores nothing, and is not decoded
    assert res.tokens[0] == "The"
    assert np.array_equal(res.raw["resid_post"][:, 0], np.full(3, res.corrupt_diff))
    assert res.n_unchanged == 2 * 3
    # each cell against one patched run through the public API: bit for bit with a stream per run
    assert res.layout == "streams"
    a_id, w_id = res.answer_id, res.wrong_id
    clean = smol.capture(CLEAN, sites=("resid_post", "resid_mid"), layers=[1, 8, 30])
    for site, li, p in (("resid_post", 1, 2), ("resid_mid", 0, 3), ("resid_post", 0, n - 1), ("resid_mid", 1, 1),
                        ("resid_post", 1, n - 2), ("resid_mid", 2, n - 1)):
        layer = res.layers[li]
        lg = smol.capture(CORRUPT, layers=[-1], patch={(site, layer): clean}, positions=[p], logits=True).logits[-1]
        want = float(lg[a_id] - lg[w_id])
        assert res.raw[site][li, p] == want, (site, layer, p)
    # the last layer keeps only the last position's rows: a patch elsewhere there changes nothing
    assert np.array_equal(res.raw["resid_post"][2, :n - 1], np.full(n - 1, res.corrupt_diff))
    assert res.raw["resid_post"][2, n - 1] == res.clean_diff
    # nothing stays behind
    assert eng.edit_hook is None and not eng.capture.edits


@pytest.mark.slow
def test_full_sweep_decode_budget(sweep_engine):
    """Every layer and position of SmolLM2 in a handful of decodes (the speed of `lcprobe patch`)."""
    res = run_patching(sweep_engine, CLEAN, CORRUPT, " Paris")
    n, L = len(res.tokens), len(res.layers)
    assert res.n_runs == L * n == 270
    assert res.layout == "streams"
    # the corrupted run, then one decode per patched position (the shared first position needs none);
    # each run decodes from its position on (two tokens at least)
    assert res.n_decodes <= n
    assert res.n_tokens <= n + L * sum(max(n - p, 2) for p in range(1, n))
    assert res.raw["resid_post"][-1, n - 1] == res.clean_diff
    assert res.unpatched_batched_diff == res.corrupt_diff


def test_different_lengths_are_refused(smol):
    with pytest.raises(LcprobeError, match=r"different lengths: clean \d+ \[.*\], corrupt \d+ \[.*\]"):
        run_patching(smol.loaded.engine, "The Eiffel Tower is in", "Rome is in", " Paris")
    with pytest.raises(LcprobeError, match="same token"):
        run_patching(smol.loaded.engine, CLEAN, CORRUPT, " Paris", " Paris")


@pytest.mark.slow
def test_patch_cli_and_heatmap(smollm2, tmp_path, capsys):
    out = tmp_path / "patch"
    rc = main(["patch", "-m", str(smollm2), "-t", "1", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Paris",
               "--layers", "1,10,20,30", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads((out / "patch.json").read_text())
    assert set(doc) >= {"sites", "clean_diff", "corrupt_diff", "tokens"}
    assert len(doc["sites"]["resid_post"]) == 4 and len(doc["sites"]["resid_post"][0]) == len(doc["tokens"])
    assert doc["wrong"] and doc["wrong_id"] != doc["answer_id"]
    from lcprobe.report.make import make_report

    figs = make_report(out).figures
    assert any(p.name == "patch.png" and p.stat().st_size > 10_000 for p in figs)
    assert main(["patch", "-m", str(smollm2), "--clean", "a b c d", "--corrupt", "a", "--answer", " x",
                 "-o", str(out)]) == 1
    assert "lcprobe: error: the prompts tokenize to different lengths" in capsys.readouterr().err
