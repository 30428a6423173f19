"""``lcprobe dump`` and ``lcprobe.read_dump`` (lcprobe.studies.dump, lcprobe.results.dump).

Ground truth: ``Model.capture`` of the same window on a model loaded with the
same options (the rows must be equal, not close), the text's own tokenization,
and an uninterrupted dump for the resumed one (byte-identical shards).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lcprobe
from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.results.dump import read_dump, read_index, shard_name
from lcprobe.studies.dump import DumpOptions, check_text, iter_paragraphs, iter_windows, run_dump

PARAGRAPHS = [
    "What is the capital of France? The capital of France is Paris, on the Seine.",
    "one two three four five six seven eight nine ten. The sun is red and the sky is blue today.",
    "Who was in Berlin? He was in Berlin, she was in Rome, and they were in Madrid last spring.",
    "A train leaves at 9:40 and arrives at 11:15; how long is the journey? It takes 95 minutes.",
]
WINDOW = 64
# One thread: on a busy 2-core machine two OpenMP threads wait on each other
# at every captured node (see tests/test_depth.py).
THREADS = "1"


def _text(tmp_path, repeat: int = 3) -> str:
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(PARAGRAPHS * repeat) + "\n", encoding="utf-8")
    return str(p)


def _argv(model, text, out, *extra: str) -> list[str]:
    return ["dump", "-m", str(model), "--text", text, "-c", str(WINDOW), "-t", THREADS, "-o", str(out), "--quiet",
            *extra]


def _load(model):
    # The options lcprobe dump loads with for -c WINDOW (n_batch = min(-b, window), one sequence).
    return lcprobe.load(model, n_ctx=WINDOW, n_batch=WINDOW, n_seq_max=1, n_threads=int(THREADS), lens_backend=None)


def _windows(d) -> list[tuple[int, int]]:
    starts = [int(i) for i in np.flatnonzero(d.positions == 0)] + [d.n_tokens]
    return list(zip(starts[:-1], starts[1:]))


# --- the text and its windows (no model) -----------------------------------------------


def test_paragraphs_and_windows(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffab cd\nef\n\n  \n\ngh\n\n\nij".encode())
    paras = list(iter_paragraphs(p))
    assert [t for t, _ in paras] == ["ab cd\nef", "gh", "ij"]
    assert paras[-1][1] == p.stat().st_size
    chars = lambda s: [ord(c) for c in s]  # noqa: E731  one token per character
    wins = [w for w, _ in iter_windows(paras, chars, 5, prefix=[0])]
    stream = chars("ab cd\nef\n\ngh\n\nij\n\n")
    assert all(w[0] == 0 and len(w) <= 5 for w in wins)
    assert [t for w in wins for t in w[1:]] == stream
    capped = [w for w, _ in iter_windows(paras, chars, 5, prefix=[0], max_tokens=12)]
    assert sum(len(w) for w in capped) == 12 and [t for w in capped for t in w[1:]] == stream[:9]


def test_check_text_refuses(tmp_path):
    with pytest.raises(LcprobeError, match="not found"):
        check_text(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text(" \n\n \n")
    with pytest.raises(LcprobeError, match="no text"):
        check_text(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(LcprobeError, match="not UTF-8"):
        check_text(tmp_path / "latin1.txt")
    src = check_text(_text(tmp_path))
    assert len(src.sha256) == 64 and src.n_bytes > 0


def test_shard_writer_cuts_exact_shards_and_counts_float16_overflow(tmp_path):
    import warnings

    from lcprobe.studies.dump import ShardWriter

    index = {"shards": [], "n_tokens": 0}
    w = ShardWriter(tmp_path, index, ["resid_post.1"], 4, "float16", shard_tokens=3)
    rows = np.arange(20, dtype=np.float32).reshape(5, 4)
    rows[1, 2] = 1e5  # beyond float16's 65504
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.add([rows], list(range(100, 105)), range(5))
        w.flush()
    assert [(e["first_token"], e["n_tokens"], e["n_nonfinite"]) for e in index["shards"]] == [(0, 3, 1), (3, 2, 0)]
    assert json.loads((tmp_path / "index.json").read_text()) == index  # rewritten after every shard
    from safetensors import safe_open

    with safe_open(str(tmp_path / shard_name(1)), framework="numpy") as f:
        assert f.get_tensor("tokens").tolist() == [103, 104] and f.get_tensor("positions").tolist() == [3, 4]
        assert np.array_equal(f.get_tensor("resid_post.1"), rows[3:].astype(np.float16))


# --- dump = capture -------------------------------------------------------------------


@pytest.mark.slow
def test_dump_rows_equal_capture(smollm2, tmp_path):
    text, out = _text(tmp_path), tmp_path / "d"
    assert main(_argv(smollm2, text, out, "--sites", "resid_post,resid_mid", "--layers", "2,-1",
                      "--dtype", "float32", "--shard-tokens", "100")) == 0
    d = read_dump(out)
    idx = d.index
    assert idx["complete"] and idx["model_sha256"] and idx["text_sha256"] == check_text(text).sha256
    assert d.sites == ["resid_post", "resid_mid"] and d.layers == [2, 30] and d.dtype == np.float32
    assert idx["tensors"] == ["resid_post.2", "resid_post.30", "resid_mid.2", "resid_mid.30"]
    assert idx["window"]["tokens"] == WINDOW and "empty KV cache" in idx["window"]["note"]
    n = d.n_tokens
    assert len(d.shards) == math.ceil(n / 100) and [s.n_tokens for s in d.shards][:-1] == [100] * (len(d.shards) - 1)
    assert [e["first_token"] for e in idx["shards"]] == [100 * k for k in range(len(d.shards))]
    with _load(smollm2) as model:
        # The whole text, paragraph by paragraph, each followed by a blank line; BOS per window if any.
        bos = idx["window"]["bos"]
        stream = [t for p in PARAGRAPHS * 3 for t in model.tokenize(p + "\n\n", add_special=False)]
        wins = _windows(d)
        assert all(b - a <= WINDOW for a, b in wins) and len(wins) == math.ceil(len(stream) / (WINDOW - len(bos)))
        assert [t for a, b in wins for t in d.tokens[a + len(bos):b]] == stream
        # Rows of windows in the first shard, across a shard boundary and the last one.
        checked = 0
        for a, b in wins:
            acts = model.capture(d.tokens[a:b].tolist(), sites=("resid_post", "resid_mid"), layers=[2, -1])
            for site in ("resid_post", "resid_mid"):
                for layer in (2, 30):
                    assert np.array_equal(d[site, layer][a:b], acts[site, layer]), (site, layer, a)
            checked += 1
        assert checked == len(wins) >= 3
    shard = d.shards[1]
    assert np.array_equal(shard["resid_mid", -1], d["resid_mid", 30][100:200])
    assert np.array_equal(shard.tokens, d.tokens[100:200])
    assert ("resid_post", 2) in d and ("resid_post", 3) not in d
    with pytest.raises(LcprobeError, match="not in this dump"):
        d["resid_pre", 2]


@pytest.mark.slow
def test_resume_after_interruption_is_identical(smollm2, tmp_path):
    text = _text(tmp_path, repeat=4)
    opts = DumpOptions(sites=("resid_pre", "resid_post"), layers="1,-1", dtype="float16", window=WINDOW,
                       shard_tokens=90, max_tokens=400)
    full, cut = tmp_path / "full", tmp_path / "cut"
    with _load(smollm2) as model:
        whole = run_dump(model.loaded, text, full, opts)
        assert whole.n_tokens == 400 and not whole.interrupted
        windows_done = []

        def stop_after_three() -> bool:
            windows_done.append(1)
            return len(windows_done) == 3

        part = run_dump(model.loaded, text, cut, opts, should_stop=stop_after_three)
        assert part.interrupted and part.tokens_decoded == 3 * WINDOW
        # float16 rows are llama.cpp's float32 rows rounded once
        d = read_dump(full)
        a, b = _windows(d)[1]
        acts = model.capture(d.tokens[a:b].tolist(), sites=("resid_pre", "resid_post"), layers=[1, -1])
        assert np.array_equal(d["resid_post", 30][a:b], acts["resid_post", 30].astype(np.float16))
        assert np.array_equal(d["resid_pre", 1][a:b], acts["resid_pre", 1].astype(np.float16))
    idx = read_index(cut)
    assert not idx["complete"] and [s["n_tokens"] for s in idx["shards"]] == [90, 90]
    assert part.tokens_dropped == 3 * WINDOW - 180
    assert read_dump(cut).n_tokens == 180  # an interrupted dump reads as its finished shards
    # A shard written but not yet listed when the process died: it is replaced.
    (cut / shard_name(2)).write_bytes(b"torn")
    argv = _argv(smollm2, text, cut, "--sites", "resid_pre,resid_post", "--layers", "1,-1", "--dtype", "float16",
                 "--shard-tokens", "90", "--max-tokens", "400")
    assert main(argv + ["--resume"]) == 0
    names = sorted(p.name for p in full.glob("shard-*"))
    assert names == sorted(p.name for p in cut.glob("shard-*")) and len(names) == 5
    for name in names:
        assert (full / name).read_bytes() == (cut / name).read_bytes(), name
    assert read_index(full) == read_index(cut)
    # Complete: --resume has nothing to do.
    assert main(argv + ["--resume"]) == 0


# --- bad input: one line, exit 1 ---------------------------------------------------------------


def _one_line_error(capsys, argv, pattern: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcprobe: error:") and "\n" not in err and "Traceback" not in err, err
    assert pattern in err, err


@pytest.mark.parametrize("extra, pattern", [
    (["--layers", "31"], "out of range"),
    (["--layers", "x"], "bad layer"),
    (["--dtype", "int8"], "unknown --dtype"),
    (["--sites", "resid_poast"], "unknown site"),
    (["--shard-tokens", "0"], "--shard-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["-c", "1"], "window"),
])
def test_bad_options(smollm2, tmp_path, capsys, extra, pattern):
    _one_line_error(capsys, _argv(smollm2, _text(tmp_path), tmp_path / "d", *extra), pattern)
    assert not (tmp_path / "d" / "index.json").exists()


def test_bad_text(smollm2, tmp_path, capsys):
    _one_line_error(capsys, _argv(smollm2, str(tmp_path / "nope.txt"), tmp_path / "d"), "text file not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    _one_line_error(capsys, _argv(smollm2, str(tmp_path / "empty.txt"), tmp_path / "d"), "no text")


@pytest.mark.slow
def test_existing_dump_refused_and_mismatch(smollm2, tmp_path, capsys):
    text, out = _text(tmp_path, repeat=1), tmp_path / "d"
    assert main(_argv(smollm2, text, out, "--layers", "-1", "--max-tokens", "40")) == 0
    capsys.readouterr()
    _one_line_error(capsys, _argv(smollm2, text, out, "--layers", "-1", "--max-tokens", "40"), "--resume")
    _one_line_error(capsys, _argv(smollm2, text, out, "--layers", "-2", "--max-tokens", "40", "--resume"),
                    "different layers")
    assert main(_argv(smollm2, text, out, "--layers", "-1", "--max-tokens", "40", "--resume")) == 0
    assert "already holds the complete dump" in capsys.readouterr().out


def test_read_dump_refuses(tmp_path):
    with pytest.raises(LcprobeError, match="no index.json"):
        read_dump(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(LcprobeError, match="unreadable"):
        read_dump(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "lcprobe-dump", "format_version": 1, "n_layer": 2,
                                                     "shards": [{"file": shard_name(0), "first_token": 0,
                                                                 "n_tokens": 3}]}))
    with pytest.raises(LcprobeError, match="missing"):
        read_dump(tmp_path)
