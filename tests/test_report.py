"""lcprobe report: figures and report.md from saved results (fabricated here with the
real writers of lcprobe.results.run / lcprobe.studies.suite, so the files have the real format)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from lcprobe.cli import main  # noqa: E402
from lcprobe.errors import LcprobeError  # noqa: E402
from lcprobe.report.make import calc_grid, chance_levels, find_runs, make_report  # noqa: E402
from lcprobe.results.run import breakdown, write_summary  # noqa: E402
from lcprobe.results.suite import write_suite  # noqa: E402
from lcprobe.studies.suite import task_entry  # noqa: E402

OPS = ("add", "sub", "mul", "div")


def _records(task: str, n_layers: int, rng: np.random.Generator, n_items: int = 24) -> list[dict]:
    """Items whose true answer gains on the false ones with depth (so best layers are late)."""
    recs = []
    for i in range(n_items):
        if task == "truthfulqa-mc":
            n, correct = 5, [0, 1]
        else:
            n, correct = 4, [int(rng.integers(4))]
        scores = rng.normal(-10, 1, size=(n, n_layers))
        for c in correct:
            scores[c] += np.linspace(-1, 3, n_layers)
        rec = {"id": str(i), "choices": [f" c{j}" for j in range(n)], "correct": correct,
               "logprobs": scores.round(4).tolist(), "n_tokens": [1] * n, "n_bytes": [3] * n}
        if task == "calc":
            rec["meta"] = {"op": OPS[i % 4], "type": ("int", "float")[(i // 4) % 2], "digits": ("1-2", "3-4")[i % 2]}
        recs.append(rec)
    return recs


def _write_run(run_dir: Path, model: str, task: str, metric: str, n_layer: int, rng: np.random.Generator) -> dict:
    run_dir.mkdir(parents=True)
    recs = _records(task, n_layer, rng)
    (run_dir / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    header = {"model": f"/models/{model}.gguf", "model_name": model, "sha256": "ab" * 32, "architecture": "llama",
              "quantization": "Q4_1", "n_layer": n_layer, "task": task, "lens": "final-norm",
              "site": "resid_post"}
    extra = {"n_skipped": 0, "complete": True, "timing": {"seconds_probe": 1.0}}
    if task == "calc":
        extra["breakdown"] = breakdown(recs, ["digits", "op", "type"])
    return write_summary(run_dir, header, list(range(1, n_layer + 1)), metric, recs, extra)


TASKS = (("calc", "acc"), ("truthfulqa-mc", "mc1"), ("reclor", "acc"))


@pytest.fixture
def fake_suite(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    suite = {"suite_version": 1, "tasks": [t for t, _ in TASKS], "models": [], "complete": True}
    for model, n_layer in (("small", 6), ("deep", 10)):
        rec = {"model": model, "name": model, "architecture": "llama", "quantization": "Q4_1",
               "n_layer": n_layer, "tasks": {}}
        for task, metric in TASKS:
            summary = _write_run(tmp_path / model / task, model, task, metric, n_layer, rng)
            rec["tasks"][task] = task_entry(summary)
        suite["models"].append(rec)
    write_suite(tmp_path, suite)
    return tmp_path


def _is_png(path: Path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_suite_report_draws_every_figure(fake_suite: Path):
    assert main(["report", str(fake_suite)]) == 0
    figs = {p.name for p in (fake_suite / "figures").glob("*.png")}
    expected = {"task-calc.png", "task-truthfulqa-mc.png", "task-reclor.png", "heatmap-small.png",
                "heatmap-deep.png", "radar.png", "calc-grid-small-calc.png", "calc-grid-deep-calc.png",
                "calc-breakdown-small-calc.png", "calc-breakdown-deep-calc.png"}
    assert figs == expected
    assert all(_is_png(fake_suite / "figures" / f) for f in figs)
    md = (fake_suite / "report.md").read_text()
    for f in expected:
        assert f"](figures/{f})" in md
    # the summary table has one row per model and task, with the saved best layer
    s = json.loads((fake_suite / "small" / "reclor" / "summary.json").read_text())
    assert f"| small | reclor | acc | 24 | {s['best_layer']}/6 | {s['best_value']:.3f} |" in md
    assert "### Per-layer values: deep" in md
    assert "| mc2 |" in md  # TruthfulQA-style metrics reported for multi-true items


def test_runs_follow_suite_order_and_values_match_items(fake_suite: Path):
    runs = find_runs(fake_suite)
    assert [(r.model, r.task) for r in runs] == [(m, t) for m in ("small", "deep") for t, _ in TASKS]
    from lcprobe.report.make import recompute

    for r in runs:
        np.testing.assert_allclose(recompute(r)[r.metric], r.values[r.metric], atol=1e-6)
        assert r.relative_depth[-1] == 1.0


def test_chance_levels_by_metric():
    recs = [{"choices": ["a", "b", "c", "d"], "correct": [2]}, {"choices": ["a", "b", "c"], "correct": [0, 1]}]
    ch = chance_levels(recs)
    assert ch["acc"] == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert ch["mc2"] == pytest.approx((1 / 4 + 2 / 3) / 2)
    # the best true answer must beat every false one: 1/(n_false + 1)
    assert ch["mc1"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert ch["mc3"] == pytest.approx((1 / 4 + 1 / 2) / 2)


def test_calc_grid_counts_and_accuracy():
    def rec(op, digits, right):
        scores = [[0.0, -1.0], [-5.0, 0.0]]  # layer 0: choice 0 wins; layer 1: choice 1 wins
        return {"choices": ["x", "y"], "correct": [0 if right else 1], "logprobs": scores,
                "meta": {"op": op, "type": "int", "digits": digits}}

    recs = [rec("add", "1-2", True), rec("add", "1-2", False), rec("mul", "5-6", True), rec("mul", "3-4", True)]
    g0 = calc_grid(recs, 0)
    assert g0["ops"] == ["add", "mul"] and g0["digits"] == ["1-2", "3-4", "5-6"]
    assert g0["cells"][("int", "add", "1-2")] == [1.0, 0.0]
    g1 = calc_grid(recs, 1)
    assert g1["cells"][("int", "mul", "5-6")] == [0.0]
    assert g1["cells"][("int", "add", "1-2")] == [0.0, 1.0]


def test_single_run_dir(fake_suite: Path, capsys):
    run_dir = fake_suite / "small" / "calc"
    assert main(["report", str(run_dir)]) == 0
    figs = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert figs == ["calc-breakdown-small-calc.png", "calc-grid-small-calc.png", "task-calc.png"]
    assert "radar chart needs at least 3 tasks" in capsys.readouterr().out


def test_directory_of_run_dirs(fake_suite: Path):
    import shutil

    (fake_suite / "suite.json").unlink()  # as `lcprobe run` leaves results/<model>/<task>
    shutil.copytree(fake_suite / "small", fake_suite / "small-copy")  # same model file, another directory
    runs = find_runs(fake_suite)
    assert {(r.model, r.task) for r in runs} == {(m, t) for m in ("small", "small-copy", "deep") for t, _ in TASKS}


def test_no_results_is_a_one_line_error(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcprobe: error: no results in") and "\n" not in err
    assert not (tmp_path / "report.md").exists()


def test_missing_matplotlib_says_install_plot_extra(fake_suite: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(fake_suite)]) == 1
    assert "lcprobe[plot]" in capsys.readouterr().err
    assert not (fake_suite / "report.md").exists()
    with pytest.raises(LcprobeError, match="lcprobe\\[plot\\]"):
        make_report(fake_suite)


def _fake_module(name: str, **attrs):
    spec = importlib.machinery.ModuleSpec(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def test_compare_and_depth_dirs_go_to_their_modules(tmp_path: Path, monkeypatch):
    calls = []

    def draw(kind):
        def f(d):
            calls.append((kind, Path(d)))
            out = Path(d) / "figures" / f"{kind}.png"
            out.parent.mkdir(exist_ok=True)
            out.write_bytes(b"png")
            return [out]
        return f

    monkeypatch.setitem(sys.modules, "lcprobe.report.compare_figures", _fake_module("lcprobe.report.compare_figures",
                                                                               draw_compare=draw("compare")))
    monkeypatch.setitem(sys.modules, "lcprobe.report.depth_figures", _fake_module("lcprobe.report.depth_figures",
                                                                             draw_depth=draw("depth")))
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "skip.json").write_text("{}")
    out = make_report(tmp_path)
    assert calls == [("compare", tmp_path), ("depth", tmp_path)]
    md = out.markdown.read_text()
    assert "](figures/compare.png)" in md and "](figures/depth.png)" in md
