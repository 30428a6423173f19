"""lcprobe suite: fail-fast loading, output layout, tables, stop and resume.

Most tests use two tiny synthetic LLaMA GGUFs (3 and 5 layers), which run the
whole suite machinery in seconds; one test runs the real SmolLM2.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest

from lcprobe.cli import main
from paths import paper_data
from lcprobe.errors import LcprobeError
from lcprobe.results.run import layer_metrics, read_items
from lcprobe.results.suite import read_suite
from lcprobe.probing.session import ProbeOptions
from lcprobe.probing.progress import StudyListener
from lcprobe.studies.suite import (
    DEFAULT_TASKS,
    load_tasks,
    parse_task_list,
    plan_models,
    run_suite,
)

DATA = str(paper_data())
needs_data = pytest.mark.skipif(not Path(DATA, "mlama_short.tsv").is_file(), reason=f"no paper data at {DATA}")


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("LCPROBE_DATA", DATA)


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory) -> tuple[Path, Path]:
    from synth import SynthSpec, write_llama_gguf

    d = tmp_path_factory.mktemp("suite-models")
    a, b = d / "synth-a.gguf", d / "synth-b.gguf"
    write_llama_gguf(a, SynthSpec(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=1))
    write_llama_gguf(b, SynthSpec(n_layer=5, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=2))
    return a, b


FAST = ["-b", "64", "-t", "1"]


def _check_layout(out: Path, stems: list[str], tasks: list[str], n_layers: dict[str, int]) -> dict:
    """Every run dir is complete and suite.json / suite.csv agree with items.jsonl."""
    suite = read_suite(out)
    assert [m["model"] for m in suite["models"]] == stems
    assert suite["tasks"] == tasks and suite["complete"] is True
    with open(out / "suite.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["model", "task", "layer", "relative_depth", "metric", "value"]
    assert len(rows) == len(tasks) * sum(n_layers[s] for s in stems)
    for m in suite["models"]:
        assert list(m["tasks"]) == tasks
        for task, e in m["tasks"].items():
            run_dir = out / m["model"] / task
            assert {"items.jsonl", "summary.json", "run.json"} <= {p.name for p in run_dir.iterdir()}
            summary = json.loads((run_dir / "summary.json").read_text())
            records = read_items(run_dir / "items.jsonl")
            n = n_layers[m["model"]]
            # recomputed from the raw log-probs, independently of summary.json
            values = layer_metrics(records, n).values[e["metric"]]
            np.testing.assert_allclose(e["values"], values, atol=1e-6)
            assert e["layers"] == list(range(1, n + 1)) and e["relative_depth"][-1] == 1.0
            assert e["best_layer"] == summary["best_layer"] and e["n_items"] == len(records) == summary["n_items"]
            assert e["best_value"] == pytest.approx(float(np.max(values)), abs=1e-6)
            assert e["last_value"] == pytest.approx(float(values[-1]), abs=1e-6)
            csv_vals = [float(r["value"]) for r in rows if r["model"] == m["model"] and r["task"] == task]
            np.testing.assert_allclose(csv_vals, values, atol=1e-6)
    return suite


def test_task_list():
    assert parse_task_list(None) == list(DEFAULT_TASKS)
    assert parse_task_list(["calc,lama", "lama", " reclor "]) == ["calc", "lama", "reclor"]
    with pytest.raises(LcprobeError):
        parse_task_list(",")


def test_missing_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, synth_pair):
    monkeypatch.setenv("LCPROBE_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/lcprobe/data either
    out = tmp_path / "out"
    assert main(["suite", "-m", str(synth_pair[0]), "-T", "calc,reclor", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lcprobe data pull" in err and "reclor" in err
    assert not out.exists()


def test_two_models_with_one_stem_are_refused(tmp_path, synth_pair):
    twin = tmp_path / "x"
    twin.mkdir()
    (twin / synth_pair[0].name).symlink_to(synth_pair[0])
    with pytest.raises(LcprobeError, match="same file stem"):
        plan_models([str(synth_pair[0]), str(twin / synth_pair[0].name)])


def test_unknown_task_is_refused_before_loading(tmp_path, capsys, synth_pair):
    assert main(["suite", "-m", str(synth_pair[0]), "-T", "calc,lamma", "-o", str(tmp_path / "o")]) == 1
    assert "did you mean 'lama'" in capsys.readouterr().err


@needs_data
def test_suite_layout_and_tables_two_models(tmp_path, capsys, synth_pair):
    out = tmp_path / "suite"
    argv = ["suite", "-m", str(synth_pair[0]), "-m", str(synth_pair[1]), "-T", "calc,lama", "--limit", "6",
            "-o", str(out), *FAST]
    assert main(argv) == 0
    _check_layout(out, ["synth-a", "synth-b"], ["calc", "lama"], {"synth-a": 3, "synth-b": 5})
    text = capsys.readouterr().out
    assert "synth-a (llama, 3 layers, F32)" in text and "synth-b (llama, 5 layers, F32)" in text
    assert "models compared" in text and "suite done" in text
    # the calc breakdown is in the per-task summary, as `lcprobe run` writes it
    summary = json.loads((out / "synth-b" / "calc" / "summary.json").read_text())
    assert set(summary["breakdown"]) == {"op", "type", "digits"}


@needs_data
def test_a_failing_task_does_not_stop_the_others(tmp_path, capsys, synth_pair):
    # reclor's passages cannot fit 512 tokens; calc's prompts can
    out = tmp_path / "s"
    argv = ["suite", "-m", str(synth_pair[0]), "-T", "reclor,calc", "--limit", "4", "-c", "512", "-o", str(out),
            *FAST]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "synth-a · reclor failed" in err and "-c/--ctx-size" in err
    suite = read_suite(out)
    assert list(suite["models"][0]["tasks"]) == ["calc"] and "reclor" in suite["models"][0]["errors"]
    assert suite["complete"] is False
    assert len(read_items(out / "synth-a" / "calc" / "items.jsonl")) == 4


class _StopAfterFirstGroup(StudyListener):
    def __init__(self) -> None:
        self.stop = False
        self.loaded: list[str] = []

    def model_loaded(self, model, seconds):
        self.loaded.append(model.stem)

    def task_progress(self, stats, best):
        if stats.items_done > 0:
            self.stop = True


@needs_data
def test_stop_and_resume_equal_an_uninterrupted_suite(tmp_path, synth_pair):
    tasks = load_tasks(["lama", "calc"])
    models = plan_models([str(p) for p in synth_pair])
    opts = ProbeOptions(limit=10, n_batch=64, n_threads=1)
    whole = run_suite(models, tasks, tmp_path / "whole", opts)
    assert not whole.interrupted and whole.suite["complete"]

    part = tmp_path / "part"
    listener = _StopAfterFirstGroup()
    first = run_suite(models, tasks, part, opts, listener=listener, should_stop=lambda: listener.stop)
    assert first.interrupted and not read_suite(part)["complete"]
    lines = len(read_items(part / "synth-a" / "lama" / "items.jsonl"))
    assert 0 < lines < 10
    assert not (part / "synth-b").exists()  # the second model was never started

    again = run_suite(models, tasks, part, opts, resume=True)
    assert not again.interrupted and again.suite["complete"]
    for stem in ("synth-a", "synth-b"):
        for task in ("lama", "calc"):
            a = (tmp_path / "whole" / stem / task / "items.jsonl").read_bytes()
            b = (part / stem / task / "items.jsonl").read_bytes()
            assert a == b, (stem, task)
    assert [m["tasks"]["lama"]["values"] for m in again.suite["models"]] == \
        [m["tasks"]["lama"]["values"] for m in whole.suite["models"]]

    # everything finished: a resume loads no model at all
    listener = _StopAfterFirstGroup()
    done = run_suite(models, tasks, part, opts, resume=True, listener=listener)
    assert done.loaded == [] and listener.loaded == [] and done.suite["complete"]

    # other options in the same directory are refused, not mixed in
    with pytest.raises(LcprobeError, match="different"):
        run_suite(models, tasks, part, ProbeOptions(limit=8, n_batch=64, n_threads=1), resume=True)


def test_ctrl_c_exits_130_and_the_printed_command_resumes(tmp_path, capsys, monkeypatch, synth_pair):
    """SIGINT during the first task: exit 130, a resume command that works, identical items."""
    from lcprobe.cli.display import StudyDisplay

    original = StudyDisplay.task_progress
    sent = []

    def progress_then_ctrl_c(self, stats, best):
        original(self, stats, best)
        if stats.items_done > 0 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # handled by lcprobe.cli.main.Interrupt

    monkeypatch.setattr(StudyDisplay, "task_progress", progress_then_ctrl_c)
    out = tmp_path / "s"
    def argv(d: Path) -> list[str]:
        return ["suite", "-m", str(synth_pair[0]), "-T", "calc", "--limit", "20", "-o", str(d), *FAST]

    assert main(argv(out)) == 130
    err = capsys.readouterr().err
    hint = next(line for line in err.splitlines() if line.startswith("resume with: "))
    command = shlex.split(hint[len("resume with: "):])
    assert command[:2] == ["lcprobe", "suite"] and command[-1] == "--resume"
    n_partial = len(read_items(out / "synth-a" / "calc" / "items.jsonl"))
    assert 0 < n_partial < 20

    monkeypatch.setattr(StudyDisplay, "task_progress", original)
    assert main(command[1:]) == 0
    assert main(argv(tmp_path / "ref")) == 0
    assert (out / "synth-a" / "calc" / "items.jsonl").read_bytes() == \
        (tmp_path / "ref" / "synth-a" / "calc" / "items.jsonl").read_bytes()


@pytest.mark.slow
@needs_data
def test_smollm2_suite_and_report(tmp_path, capsys, smollm2):
    pytest.importorskip("matplotlib")
    out = tmp_path / "smol"
    assert main(["suite", "-m", str(smollm2), "-T", "calc,lama", "--limit", "4", "-o", str(out), *FAST]) == 0
    stem = smollm2.stem
    suite = _check_layout(out, [stem], ["calc", "lama"], {stem: 30})
    assert suite["models"][0]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"task-calc.png", "task-lama.png", f"heatmap-{stem}.png", f"calc-grid-{stem}-calc.png",
            f"calc-breakdown-{stem}-calc.png"} <= figs
    md = (out / "report.md").read_text()
    assert f"| {stem} | lama | mc1 | 4 |" in md
