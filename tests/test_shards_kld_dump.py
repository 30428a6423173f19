"""--shard I/N on kld and dump, and lcprobe merge of their directories.

kld: the synthetic F32 model against its Q8_0 copy (nonzero KL at every layer),
five chunks in two shards of two and three; the merged kld.json must equal the
unsharded one apart from ``seconds``, bit for bit (the statistics are
recomputed from the shards' per-token values). dump: the synthetic model
(the partition is the same for any model, and it decodes in milliseconds),
windows of 64 tokens, decode batches of 32 and shard files of 40 rows, so the
two parts' boundary falls inside a window and inside a batch; the second part
is interrupted and resumed. The merged files must be the unsharded dump's,
byte for byte, and read back identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcprobe.cli import main
from lcprobe.results.dump import read_dump, read_index
from lcprobe.results.merge import shard_range


def test_shard_range_is_contiguous_and_complete():
    for total in (0, 1, 5, 17):
        for count in (1, 2, 3, 7):
            spans = [shard_range(total, i, count) for i in range(1, count + 1)]
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


# --- kld ------------------------------------------------------------------------------------


def _kld_text(path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "it"]
    rng = np.random.default_rng(3)
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 600)) + "\n", encoding="utf-8")
    return path


def _without_seconds(path: Path) -> dict:
    r = json.loads(path.read_text())
    r["base"].pop("seconds")
    for m in r["models"]:
        m.pop("seconds")
    return r


@pytest.fixture(scope="module")
def kld_shards(synth_model, synth_q8, tmp_path_factory) -> tuple[Path, list[Path], list[str]]:
    d = tmp_path_factory.mktemp("kld-shards")
    text = _kld_text(d / "text.txt")
    # --layer-tokens 40 over 5 chunks samples 8 of 15 positions per chunk: a shard sampling from its
    # own chunk count would take all 15 and differ
    base = ["kld", "-m", str(synth_model[0]), "-m", str(synth_q8[0]), "--text", str(text), "-c", "32",
            "--chunks", "5", "--layer-tokens", "40", "-t", "1", "--quiet"]
    assert main([*base, "-o", str(d / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "-o", str(d / f"k{i}")]) == 0
    return d / "whole", [d / "k1", d / "k2"], base


def test_kld_shards_merge_to_the_unsharded_run(kld_shards, tmp_path, capsys):
    whole, parts, _ = kld_shards
    shards = [json.loads((p / "kld.json").read_text())["shard"] for p in parts]
    assert [s["chunks"] for s in shards] == [[0, 2], [2, 5]] and all(s["complete"] for s in shards)
    assert not (whole / "kld-values.npz").exists() and (parts[0] / "kld-values.npz").is_file()
    out = tmp_path / "merged"
    assert main(["merge", str(parts[1]), str(parts[0]), "-o", str(out)]) == 0
    assert "merged kld: 1 model(s)" in capsys.readouterr().out
    a, b = _without_seconds(whole / "kld.json"), _without_seconds(out / "kld.json")
    assert a == b
    m = b["models"][0]
    assert m["final"]["kld_mean"] > 0 and len(m["layers"]) == 3 and m["layers"][-1]["kld_mean"] > 0
    assert b["text"]["chunks"] == 5 and b["lens"]["tokens_per_layer"] == 5 * 8
    assert not (out / "kld-values.npz").exists()


@pytest.mark.parametrize("case", ["missing", "twice", "other_options", "other_model", "incomplete", "not_a_shard"])
def test_kld_merge_refuses(case, kld_shards, tmp_path, capsys):
    whole, parts, base = kld_shards
    dirs = [str(p) for p in parts]
    expect = {"missing": "shard(s) 2/2 missing", "twice": "given twice",
              "other_options": "different option layer_tokens", "other_model": "different base model sha256",
              "incomplete": "incomplete", "not_a_shard": "not a shard"}[case]
    if case == "missing":
        dirs = dirs[:1]
    elif case == "twice":
        dirs = [dirs[0], *dirs]
    elif case == "other_options":
        other = tmp_path / "other"
        i = base.index("--layer-tokens")
        assert main([*base[:i + 1], "41", *base[i + 2:], "--shard", "2/2", "-o", str(other)]) == 0
        dirs[1] = str(other)
    elif case in ("other_model", "incomplete"):
        bad = tmp_path / "bad"
        shutil.copytree(parts[1], bad)
        r = json.loads((bad / "kld.json").read_text())
        if case == "other_model":
            r["base"]["sha256"] = "0" * 64
        else:
            r["shard"]["complete"] = False
        (bad / "kld.json").write_text(json.dumps(r))
        dirs[1] = str(bad)
    elif case == "not_a_shard":
        dirs[1] = str(whole)
    capsys.readouterr()
    assert main(["merge", *dirs, "-o", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcprobe: error: ") and expect in err and "\n" not in err, err


def test_kld_refuses_more_shards_than_chunks(synth_model, tmp_path, capsys):
    text = _kld_text(tmp_path / "text.txt")
    argv = ["kld", "-m", str(synth_model[0]), "-m", str(synth_model[0]), "--text", str(text), "-c", "32",
            "--chunks", "2", "--layer-tokens", "0", "-t", "1", "--quiet", "--shard", "3/3", "-o", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "fewer than 3 shards" in err and "\n" not in err


# --- dump -----------------------------------------------------------------------------------

PARAGRAPHS = [
    "What is the capital of France? The capital of France is Paris, on the Seine.",
    "one two three four five six seven eight nine ten. The sun is red and the sky is blue today.",
    "Who was in Berlin? He was in Berlin, she was in Rome, and they were in Madrid last spring.",
]


def _dump_argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["dump", "-m", str(model), "--text", str(text), "-c", "64", "-b", "32", "-t", "1", "--layers", "2,-1",
            "--sites", "resid_post,resid_mid", "--shard-tokens", "40", "-o", str(out), "--quiet", *extra]


def test_dump_parts_merge_to_the_unsharded_dump(synth_model, tmp_path, capsys):
    import lcprobe
    from lcprobe.studies.dump import DumpOptions, run_dump

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(PARAGRAPHS * 2) + "\n", encoding="utf-8")
    model = synth_model[0]
    whole, p1, p2 = tmp_path / "whole", tmp_path / "p1", tmp_path / "p2"
    assert main(_dump_argv(model, text, whole)) == 0
    assert main(_dump_argv(model, text, p1, "--shard", "1/2")) == 0
    # part 2 stopped after the second window (the first one it decodes), then resumed from the command line
    opts = DumpOptions(sites=("resid_post", "resid_mid"), layers="2,-1", window=64, shard_tokens=40, part=(2, 2))
    calls = []
    with lcprobe.load(model, n_ctx=64, n_batch=32, n_seq_max=1, n_threads=1, lens_backend=None) as m:
        cut = run_dump(m.loaded, text, p2, opts, should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert cut.interrupted and not read_index(p2)["complete"] and len(read_index(p2)["shards"]) == 1
    assert main(_dump_argv(model, text, p2, "--shard", "2/2")) == 1  # not without --resume
    assert main(_dump_argv(model, text, p2, "--shard", "1/2", "--resume")) == 1  # another part
    assert "different --shard I/N" in capsys.readouterr().err
    assert main(_dump_argv(model, text, p2, "--shard", "2/2", "--resume")) == 0

    w = read_index(whole)
    i1, i2 = read_index(p1), read_index(p2)
    n_files = len(w["shards"])
    assert n_files >= 3 and i1["part"]["total_files"] == n_files and i1["part"]["total_tokens"] == w["n_tokens"]
    assert i1["part"]["tokens"][1] % 32 != 0  # the boundary is inside a window, and inside a decode batch
    assert [e["file"] for e in i1["shards"] + i2["shards"]] == [e["file"] for e in w["shards"]]

    out = tmp_path / "merged"
    assert main(["merge", str(p2), str(p1), "-o", str(out)]) == 0
    assert "merged dump:" in capsys.readouterr().out
    assert read_index(out) == w
    for e in w["shards"]:
        assert (out / e["file"]).read_bytes() == (whole / e["file"]).read_bytes(), e["file"]
    a, b = read_dump(whole), read_dump(out)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.positions, b.positions)
    for site in ("resid_post", "resid_mid"):
        for layer in (2, 3):
            assert np.array_equal(a[site, layer], b[site, layer]), (site, layer)

    # refusals: a part missing, and parts of another dump
    capsys.readouterr()
    assert main(["merge", str(p1), "-o", str(tmp_path / "m2")]) == 1
    assert "shard(s) 2/2 missing" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(p2, bad)
    idx = json.loads((bad / "index.json").read_text())
    idx["text_sha256"] = "0" * 64
    (bad / "index.json").write_text(json.dumps(idx))
    assert main(["merge", str(p1), str(bad), "-o", str(tmp_path / "m3")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not shards of one dump: different text_sha256" in err and "\n" not in err
