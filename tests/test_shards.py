"""--shard I/N and lcprobe merge: shards decode the unsharded run's own batches, so the
merged items.jsonl is byte-identical to an unsharded run's and summary.json equal
apart from timing; merge refuses directories that are not every part of one run.

Real llama.cpp throughout: SmolLM2 for the run, a tiny synthetic LLaMA for the suite
and the refusals (-b 64 gives several decode groups, so every shard holds some)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lcprobe.cli import main
from lcprobe.cli.common import parse_shard
from lcprobe.errors import LcprobeError
from lcprobe.results.merge import from_ranges, to_ranges

FAST = ["-b", "64", "-t", "1", "--quiet"]


def _without_timing(path: Path) -> dict:
    s = json.loads(path.read_text())
    s.pop("timing")
    return s


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "1", "a/b", "1/2/3"):
        with pytest.raises(LcprobeError, match="--shard"):
            parse_shard(bad)


def test_ranges_round_trip():
    pos = [0, 1, 2, 7, 8, 12]
    assert to_ranges(pos) == [[0, 3], [7, 9], [12, 13]]
    assert from_ranges(to_ranges(pos)) == pos


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from synth import SynthSpec, write_llama_gguf

    path = tmp_path_factory.mktemp("shard-model") / "synth-shard.gguf"
    write_llama_gguf(path, SynthSpec(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3))
    return path


@pytest.fixture(scope="module")
def synth_shards(synth, tmp_path_factory) -> tuple[Path, list[Path]]:
    """An unsharded calc run and its three shards on the synthetic model."""
    d = tmp_path_factory.mktemp("synth-shards")
    base = ["run", "-m", str(synth), "-T", "calc", "--limit", "20", *FAST]
    assert main([*base, "-o", str(d / "whole")]) == 0
    parts = []
    for i in (1, 2, 3):
        assert main([*base, "--shard", f"{i}/3", "-o", str(d / f"part{i}")]) == 0
        parts.append(d / f"part{i}")
    return d / "whole", parts


def test_shards_partition_the_items(synth_shards):
    whole, parts = synth_shards
    counts = [len((p / "items.jsonl").read_text().splitlines()) for p in parts]
    assert sum(counts) == 20 and all(c > 0 for c in counts)
    for i, p in enumerate(parts, 1):
        s = json.loads((p / "summary.json").read_text())
        assert s["shard"]["index"] == i and s["shard"]["count"] == 3 and s["complete"] is True
        assert json.loads((p / "run.json").read_text())["shard"] == [i, 3]


def test_merge_equals_the_unsharded_run(synth_shards, tmp_path, capsys):
    whole, parts = synth_shards
    out = tmp_path / "merged"
    assert main(["merge", str(parts[2]), str(parts[0]), str(parts[1]), "-o", str(out)]) == 0
    assert "merged run: 20 items" in capsys.readouterr().out
    assert (out / "items.jsonl").read_bytes() == (whole / "items.jsonl").read_bytes()
    assert _without_timing(out / "summary.json") == _without_timing(whole / "summary.json")
    assert (out / "run.json").read_bytes() == (whole / "run.json").read_bytes()
    assert json.loads((out / "summary.json").read_text())["timing"]["shards"] == 3


@pytest.mark.parametrize("case", ["missing", "twice", "other_run", "incomplete", "not_a_shard", "into_a_shard"])
def test_merge_refuses(case, synth_shards, synth, tmp_path, capsys):
    whole, parts = synth_shards
    dirs = [str(p) for p in parts]
    out = str(tmp_path / "merged")
    expect = {"missing": "shard(s) 3/3 missing", "twice": "given twice", "other_run": "different limit",
              "incomplete": "incomplete", "not_a_shard": "not a shard", "into_a_shard": "is one of the shards"}[case]
    if case == "missing":
        dirs = dirs[:2]
    elif case == "twice":
        dirs = [dirs[0], dirs[0], dirs[1], dirs[2]]
    elif case == "other_run":
        other = tmp_path / "other"
        assert main(["run", "-m", str(synth), "-T", "calc", "--limit", "19", *FAST, "--shard", "3/3",
                     "-o", str(other)]) == 0
        dirs[2] = str(other)
    elif case == "incomplete":
        bad = tmp_path / "bad"
        shutil.copytree(parts[2], bad)
        s = json.loads((bad / "summary.json").read_text())
        s["complete"] = False
        (bad / "summary.json").write_text(json.dumps(s))
        dirs[2] = str(bad)
    elif case == "not_a_shard":
        dirs[2] = str(whole)
    elif case == "into_a_shard":
        out = dirs[0]
    assert main(["merge", *dirs, "-o", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcprobe: error: ") and expect in err and "\n" not in err


def test_suite_shards_merge(synth, tmp_path):
    base = ["suite", "-m", str(synth), "-T", "calc,calc-add-int-1-2", "--limit", "10", *FAST]
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}")]) == 0
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "-o", str(tmp_path / "merged")]) == 0
    whole, merged = tmp_path / "whole", tmp_path / "merged"
    for task in ("calc", "calc-add-int-1-2"):
        run = Path("synth-shard") / task
        assert (merged / run / "items.jsonl").read_bytes() == (whole / run / "items.jsonl").read_bytes()
        assert _without_timing(merged / run / "summary.json") == _without_timing(whole / run / "summary.json")
    assert (merged / "suite.csv").read_bytes() == (whole / "suite.csv").read_bytes()
    a, b = (json.loads((d / "suite.json").read_text()) for d in (whole, merged))
    for s in (a, b):
        s.pop("seconds")
        for m in s["models"]:
            for e in m["tasks"].values():
                e.pop("seconds")
    assert a == b


@pytest.mark.slow
def test_smollm2_shards_are_bit_identical(smollm2, tmp_path):
    """The real model: two shards merged equal the unsharded run byte for byte."""
    base = ["run", "-m", str(smollm2), "-T", "calc", "--limit", "12", *FAST]
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "-o", str(tmp_path / f"p{i}")]) == 0
    assert main(["merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "-o", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "items.jsonl").read_bytes() == (tmp_path / "whole" / "items.jsonl").read_bytes()
    assert _without_timing(tmp_path / "m" / "summary.json") == _without_timing(tmp_path / "whole" / "summary.json")


def test_compare_shards_merge(synth_model, synth_q8, tmp_path):
    """Task metrics and runs exact; representation measures too (--max-rows covers every row)."""
    base = ["compare", "-m", str(synth_model[0]), "-m", str(synth_q8[0]), "-T", "calc", "--limit", "10", *FAST]
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "-o", str(tmp_path / f"c{i}")]) == 0
    assert main(["merge", str(tmp_path / "c1"), str(tmp_path / "c2"), "-o", str(tmp_path / "merged")]) == 0
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("whole", "merged"))
    for m in a["models"]:
        run = Path(m["dir"]) / "calc"
        assert (tmp_path / "merged" / run / "items.jsonl").read_bytes() == \
            (tmp_path / "whole" / run / "items.jsonl").read_bytes()
    ta, tb = a["tasks"]["calc"], b["tasks"]["calc"]
    assert ta["n_items"] == tb["n_items"] == 10 and ta["rows_compared"] == tb["rows_compared"] > 0
    for ea, eb in zip(ta["models"], tb["models"]):
        assert ea["best_layer"] == eb["best_layer"] and ea["rows_compared"] == eb["rows_compared"]
        for ra, rb in zip(ea["layers"], eb["layers"]):
            for k in ("metric", "ref_metric", "delta", "mcnemar_p", "flips_gained", "flips_lost"):
                assert ra[k] == rb[k], k
            for k in ("kl", "cosine", "rel_l2", "top1"):
                assert rb[k] == ra[k], k


def _compare_tasks(path: Path) -> dict:
    """compare.json's tasks without what differs between any two runs: timing and output paths."""
    tasks = json.loads(path.read_text())["tasks"]
    for tr in tasks.values():
        for m in tr["models"]:
            m.pop("seconds_representation")
            m.pop("dir")
    return tasks


def test_compare_shard_sums_merge_exactly(synth_model, synth_q8, tmp_path):
    """With --max-rows above every row, the merged compare.json equals the unsharded one: the shards'
    float64 per-item sums (compare-sums.npz) are re-added in the unsharded order. Shards without
    them (written before) still merge, from their rounded means."""
    base = ["compare", "-m", str(synth_model[0]), "-m", str(synth_q8[0]), "-T", "calc,calc-add-int-1-2",
            "--limit", "10", *FAST]
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "compare-sums.npz").exists()
    for i in (1, 2, 3):
        assert main([*base, "--shard", f"{i}/3", "-o", str(tmp_path / f"c{i}")]) == 0
        assert (tmp_path / f"c{i}" / "compare-sums.npz").is_file()
    shards = [str(tmp_path / f"c{i}") for i in (3, 1, 2)]  # any order
    assert main(["merge", *shards, "-o", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "compare-sums.npz").exists()
    whole = _compare_tasks(tmp_path / "whole" / "compare.json")
    assert _compare_tasks(tmp_path / "merged" / "compare.json") == whole
    for tr in whole.values():
        assert tr["rows_compared"] > 0 and tr["models"][1]["layers"][-1]["kl"] is not None

    for i in (1, 2, 3):
        shutil.copytree(tmp_path / f"c{i}", tmp_path / f"old{i}")
        (tmp_path / f"old{i}" / "compare-sums.npz").unlink()
    assert main(["merge", *(str(tmp_path / f"old{i}") for i in (1, 2, 3)), "-o", str(tmp_path / "m2")]) == 0
    approx = _compare_tasks(tmp_path / "m2" / "compare.json")
    for task, tr in whole.items():
        for ea, eb in zip(tr["models"], approx[task]["models"]):
            for ra, rb in zip(ea["layers"], eb["layers"]):
                for k in ("kl", "cosine", "rel_l2", "top1"):
                    assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-9), k
