"""Stream a text's activations to disk: the driver behind ``lcprobe dump``.

The text is read paragraph by paragraph (blank lines separate paragraphs, as
for ``lcprobe depth --text``); each paragraph is tokenized without special
tokens and followed by a blank line, and the token stream is cut into windows
of ``window`` tokens. Every window is decoded from an empty KV cache, with
the model's BOS token first when the model adds one (the BOS counts towards
the window and is dumped like any token, at position 0). Windows ignore
paragraph boundaries, so every token but the first few of a window sees a
long context.

Rows go straight from each ``llama_decode`` (n_batch tokens) into one
preallocated shard buffer in the dump's dtype; a full buffer is written as a
shard (:mod:`lcprobe.results.dump`) and reused. Neither the text, its tokens
nor the windows are held in memory as a whole. A stop request is honoured
after the current window; the rows of the unfinished shard are dropped and
decoded again on resume, so shards always hold ``shard_tokens`` rows and a
resumed dump is byte-identical to an uninterrupted one.

*Parts* (``--shard I/N``, ``DumpOptions.part``; not to be confused with the
shard files of ``shard_tokens`` rows): the shard files the whole dump would
have are split into N contiguous ranges (:func:`lcprobe.results.merge.shard_range`
over their count, which a tokenization pass over the text gives) and part I
writes only its range's files, under their own names. It decodes the windows
that overlap its rows, the first from its start as the whole dump does (the
rows before the part's first are dropped, as on resume) and the last only up
to the decode batch holding the part's last row, so its files are
byte-identical to the whole dump's. At most one window per boundary between
parts is decoded twice. ``lcprobe merge`` links the parts' files into one
directory and writes the whole dump's index.json.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.files.modelfile import ModelInfo
from lcprobe.files.plan import fmt_bytes, machine_ram
from lcprobe.llama.capture import Site
from lcprobe.llama.loader import LoadedModel
from lcprobe.results.dump import (DEFAULT_SHARD_TOKENS, FORMAT, FORMAT_VERSION, INDEX, check_dtype, read_index,
                                  resume_mismatch, shard_name, tensor_name, write_index, write_shard)
from lcprobe.results.merge import shard_range
from lcprobe.sites import check_site, parse_layers
from lcprobe.results.lock import locks_output

#: Share of the available RAM the shard buffer and the capture may take.
DUMP_RAM_FRACTION = 0.5


WINDOW_NOTE = ("each window is decoded from an empty KV cache; BOS first in every window when the model adds "
               "one; paragraphs (blank-line separated) are tokenized one by one, each followed by a blank line")

Progress = Callable[["DumpProgress"], None]

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class DumpOptions:
    """What to dump and how to cut it. ``layers`` as ``--layers`` (None = all)."""

    sites: tuple[str, ...] = ("resid_post",)
    layers: str | None = None
    dtype: str = "float16"
    window: int = 2048
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    max_tokens: int | None = None
    # (i, n), --shard I/N: write only the i-th of n ranges of the dump's shard files; 'lcprobe merge' joins them
    part: tuple[int, int] | None = None

    def validate(self) -> None:
        """Checks that need no model: refuse bad values before anything loads."""
        check_dtype(self.dtype)
        if self.part is not None and not 1 <= self.part[0] <= self.part[1]:
            raise LcprobeError(f"--shard {self.part[0]}/{self.part[1]}: I must be between 1 and N")
        if not self.sites:
            raise LcprobeError("--sites selects no site")
        for s in self.sites:
            check_site(s)
        if len(set(self.sites)) != len(self.sites):
            raise LcprobeError(f"--sites names a site twice: {','.join(self.sites)}")
        if self.window < 2:
            raise LcprobeError("-c/--ctx-size (the window) must be at least 2 tokens")
        if self.shard_tokens < 1:
            raise LcprobeError(f"--shard-tokens must be at least 1, got {self.shard_tokens}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LcprobeError(f"--max-tokens must be at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class TextSource:
    """A checked UTF-8 text file: its path, sha256 and size."""

    path: Path
    sha256: str
    n_bytes: int


@dataclass(frozen=True)
class DumpProgress:
    tokens: int  # tokens in finished windows, those kept from a resumed dump included
    tokens_decoded: int  # tokens decoded in this run
    tokens_written: int  # tokens in shards on disk
    shards: int
    text_bytes: int  # bytes of the text consumed
    text_total: int
    max_tokens: int | None
    seconds: float


@dataclass
class DumpOutcome:
    out_dir: Path
    index: dict[str, Any]
    interrupted: bool
    tokens_decoded: int  # this run
    tokens_kept: int  # from the dump being resumed
    tokens_dropped: int  # decoded but not written (the unfinished shard of an interrupted run)
    seconds: float
    already_complete: bool = False

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_decoded / self.seconds if self.seconds > 0 else 0.0


# --- the text -------------------------------------------------------------------


def check_text(path: str | os.PathLike) -> TextSource:
    """Hash the file and check it is non-empty UTF-8, reading it in blocks (it may be large)."""
    p = Path(path).expanduser()
    h, n, has_text = hashlib.sha256(), 0, False
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        with open(p, "rb") as fh:
            while block := fh.read(_READ_BLOCK):
                h.update(block)
                try:
                    has_text = bool(decoder.decode(block).strip()) or has_text
                except UnicodeDecodeError as e:
                    raise LcprobeError(f"{p}: not UTF-8 text (byte {n + e.start})") from None
                n += len(block)
            decoder.decode(b"", final=True)
    except FileNotFoundError:
        raise LcprobeError(f"{p}: text file not found") from None
    except IsADirectoryError:
        raise LcprobeError(f"{p}: is a directory, not a text file") from None
    except UnicodeDecodeError:
        raise LcprobeError(f"{p}: not UTF-8 text (it ends inside a character)") from None
    except OSError as e:
        raise LcprobeError(f"{p}: cannot read ({e.strerror})") from None
    if not has_text:
        raise LcprobeError(f"{p}: no text")
    return TextSource(p, h.hexdigest(), n)


def iter_paragraphs(path: str | os.PathLike) -> Iterator[tuple[str, int]]:
    """Blank-line separated paragraphs (stripped, non-empty) and the bytes read up to each one's end."""
    lines: list[str] = []
    read = 0
    with open(path, "rb") as fh:
        for k, raw in enumerate(fh):
            read += len(raw)
            line = raw.decode("utf-8-sig" if k == 0 else "utf-8")
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip(), read
                lines = []
    if lines:
        yield "".join(lines).strip(), read


def iter_windows(paragraphs: Iterable[tuple[str, int]], tokenize: Callable[[str], list[int]], window: int,
                 prefix: Sequence[int] = (), max_tokens: int | None = None) -> Iterator[tuple[list[int], int]]:
    """Windows of at most ``window`` tokens (``prefix`` first, counted in the window and in
    ``max_tokens``) and the text bytes consumed when each was cut."""
    prefix = list(prefix)
    room = window - len(prefix)
    if room < 1:
        raise LcprobeError(f"a window of {window} tokens leaves no room for text after the BOS token")
    left = max_tokens if max_tokens is not None else None
    current: list[int] = []
    read = 0
    for text, read in paragraphs:
        ids = tokenize(text + "\n\n")
        pos = 0
        while pos < len(ids):
            cap = room - len(current)
            if left is not None:
                cap = min(cap, left - len(prefix) - len(current))
                if cap <= 0:
                    break
            current.extend(ids[pos:pos + cap])
            pos += cap
            if len(current) == room:
                if left is not None:
                    left -= window
                yield prefix + current, read
                current = []
        if pos < len(ids):
            break
    if current:
        yield prefix + current, read


# --- memory ---------------------------------------------------------------------


def tensor_pairs(info: ModelInfo, options: DumpOptions) -> list[tuple[str, int]]:
    """(site, layer) of every tensor in a shard, site-major as in --sites."""
    layers = parse_layers(options.layers, info.n_layer)
    return [(check_site(s), layer) for s in options.sites for layer in layers]


def capture_nodes(info: ModelInfo, pairs: Sequence[tuple[str, int]]) -> dict[str, int]:
    """llama.cpp node -> row block in the capture; resid_pre of layer i and resid_post of i-1 share one."""
    nodes: dict[str, int] = {}
    for s, layer in pairs:
        nodes.setdefault(info.site_name(s, layer), len(nodes))
    return nodes


def dump_memory(info: ModelInfo, options: DumpOptions, n_batch: int) -> tuple[int, str]:
    """Bytes the dump needs besides the model, and how they add up."""
    pairs = tensor_pairs(info, options)
    nodes = capture_nodes(info, pairs)
    itemsize = np.dtype(check_dtype(options.dtype)).itemsize
    shard = options.shard_tokens * (len(pairs) * info.n_embd * itemsize + 8)
    chunk = min(n_batch, options.window) * len(nodes) * info.n_embd * 4
    # safetensors serializes a shard into one bytes object before writing it, and
    # the engine's rows are copied out of the native buffer: both double.
    need = 2 * shard + 2 * chunk
    how = (f"a shard of {options.shard_tokens} tokens x {len(pairs)} tensors x {info.n_embd} "
           f"{check_dtype(options.dtype)} is {fmt_bytes(shard)} (twice while it is written)")
    return need, how


def check_dump_memory(info: ModelInfo, options: DumpOptions, n_batch: int) -> None:
    """Refuse a shard buffer that would take more than half the available RAM."""
    need, how = dump_memory(info, options, n_batch)
    _, available = machine_ram()
    if need > DUMP_RAM_FRACTION * available:
        raise LcprobeError(f"{how}; with the capture that needs {fmt_bytes(need)}, more than half the available "
                           f"RAM ({fmt_bytes(available)}); lower --shard-tokens, or dump fewer layers or sites")


# --- shards ---------------------------------------------------------------------


class ShardWriter:
    """The one shard buffer: rows are appended in token order; a full buffer is written and reused."""

    def __init__(self, out_dir: Path, index: dict[str, Any], names: list[str], n_embd: int, dtype: str,
                 shard_tokens: int, first_file: int = 0) -> None:
        self.dir = out_dir
        self.index = index
        self.size = shard_tokens
        # a part's files are numbered, and their rows counted, as in the whole dump
        self.first_file = first_file
        self.names = names
        self.arrays = {n: np.empty((shard_tokens, n_embd), dtype) for n in names}
        self.tokens = np.empty(shard_tokens, np.int32)
        self.positions = np.empty(shard_tokens, np.int32)
        self.fill = 0

    @property
    def written(self) -> int:
        return int(self.index["n_tokens"])

    def add(self, blocks: Sequence[np.ndarray], tokens: Sequence[int], positions: Sequence[int]) -> None:
        """Append rows: ``blocks[i]`` is ``(n, n_embd)`` for tensor ``names[i]``."""
        n, a = len(tokens), 0
        while a < n:
            k = min(n - a, self.size - self.fill)
            f = self.fill
            # The cast to float16, if any, happens here. Values beyond its range become inf (Gemma 3's
            # BOS row reaches 8e4); they are counted per shard and reported, not warned about per row.
            with np.errstate(over="ignore"):
                for name, block in zip(self.names, blocks):
                    self.arrays[name][f:f + k] = block[a:a + k]
            self.tokens[f:f + k] = tokens[a:a + k]
            self.positions[f:f + k] = positions[a:a + k]
            self.fill += k
            a += k
            if self.fill == self.size:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard, then the index that lists it."""
        if self.fill == 0:
            return
        n = self.fill
        k = self.first_file + len(self.index["shards"])
        arrays = {name: a[:n] for name, a in self.arrays.items()}
        nonfinite = sum(int(np.count_nonzero(~np.isfinite(a))) for a in arrays.values())
        arrays["tokens"] = self.tokens[:n]
        arrays["positions"] = self.positions[:n]
        size = write_shard(self.dir / shard_name(k), arrays)
        self.index["shards"].append({"file": shard_name(k), "first_token": self.first_file * self.size + self.written,
                                     "n_tokens": n, "bytes": size, "n_nonfinite": nonfinite})
        self.index["n_tokens"] = self.written + n
        write_index(self.dir, self.index)
        self.fill = 0


# --- the driver -----------------------------------------------------------------


def _bos(loaded: LoadedModel) -> list[int]:
    return loaded.engine.tokenize("", add_special=True)


def dump_index(loaded: LoadedModel, text: TextSource, options: DumpOptions,
               part: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fresh index: what is dumped and how (:data:`lcprobe.results.dump.RESUME_KEYS` must match to resume).
    A part's record (:func:`plan_part`) is the last key, so the merged index, which drops it, is the whole
    dump's key for key."""
    from lcprobe.probing.session import versions

    info, lo = loaded.info, loaded.options
    pairs = tensor_pairs(info, options)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": str(info.path), "model_name": info.name, "model_sha256": loaded.sha256, "arch": info.arch,
        "quantization": info.file_type, "n_layer": info.n_layer, "n_embd": info.n_embd,
        "sites": list(options.sites), "layers": sorted({layer for _, layer in pairs}),
        "tensors": [tensor_name(s, layer) for s, layer in pairs], "dtype": check_dtype(options.dtype),
        "text": str(text.path), "text_sha256": text.sha256, "text_bytes": text.n_bytes,
        "window": {"tokens": options.window, "bos": _bos(loaded), "note": WINDOW_NOTE},
        "decode": {"n_batch": min(loaded.engine.n_batch, options.window), "kv_type": lo.kv_type,
                   "flash_attn": lo.flash_attn, "n_gpu_layers": lo.n_gpu_layers},
        "shard_tokens": options.shard_tokens, "max_tokens": options.max_tokens,
        "shards": [], "n_tokens": 0, "n_windows": None, "complete": False, "versions": versions(),
    } | ({"part": part} if part is not None else {})


def plan_part(loaded: LoadedModel, text: TextSource, options: DumpOptions) -> dict[str, Any]:
    """Which shard files and rows part ``options.part`` writes: a tokenization pass over the whole text
    (no decoding) gives the dump's length, its shard files are cut into contiguous ranges."""
    i, n = options.part
    tokenize = lambda s: loaded.engine.tokenize(s, add_special=False)  # noqa: E731
    total = windows = 0
    for win, _ in iter_windows(iter_paragraphs(text.path), tokenize, options.window, _bos(loaded),
                               options.max_tokens):
        total += len(win)
        windows += 1
    n_files = -(-total // options.shard_tokens)
    f0, f1 = shard_range(n_files, i, n)
    return {"index": i, "count": n, "files": [f0, f1],
            "tokens": [f0 * options.shard_tokens, min(f1 * options.shard_tokens, total)],
            "total_tokens": total, "total_windows": windows, "total_files": n_files}


def check_existing(out_dir: str | os.PathLike, info: ModelInfo, options: DumpOptions, text: TextSource,
                   resume: bool) -> None:
    """Before loading: refuse a directory holding a dump that cannot be continued with these options
    (what needs the loaded model, its sha256 and BOS, is checked again by :func:`run_dump`)."""
    out = Path(out_dir)
    if not (out / INDEX).exists():
        return
    old = read_index(out)
    if not resume:
        _refuse_existing(out, old)
    pairs = tensor_pairs(info, options)
    new = {"sites": list(options.sites), "layers": sorted({layer for _, layer in pairs}),
           "dtype": check_dtype(options.dtype), "text_sha256": text.sha256, "shard_tokens": options.shard_tokens,
           "max_tokens": options.max_tokens, "window": options.window,
           "part": list(options.part) if options.part else None}
    part = old.get("part")
    old = {**old, "window": old.get("window", {}).get("tokens"),
           "part": [part["index"], part["count"]] if isinstance(part, dict) else None}
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        _refuse_mismatch(out, diff)


def _refuse_existing(out_dir: Path, old: dict[str, Any]) -> None:
    raise LcprobeError(f"{out_dir} already holds a dump ({old.get('n_tokens', 0)} tokens in "
                       f"{len(old.get('shards', []))} shards); continue it with --resume or choose another -o")


def _refuse_mismatch(out_dir: Path, diff: list[str]) -> None:
    names = [{"part": "--shard I/N"}.get(k, k) for k in diff]
    raise LcprobeError(f"{out_dir} holds a dump with a different {', '.join(names)}; "
                       "use another -o or the same options as the first run")


def _start(out_dir: Path, fresh: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The index to continue: the fresh one, or the one on disk when resuming a matching dump."""
    if not (out_dir / INDEX).exists():
        return fresh
    old = read_index(out_dir)
    if not resume:
        _refuse_existing(out_dir, old)
    diff = resume_mismatch(old, fresh)
    if diff:
        _refuse_mismatch(out_dir, diff)
    for entry in old["shards"]:
        p = out_dir / entry["file"]
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise LcprobeError(f"{p}: listed in {INDEX} but missing or of another size; cannot resume this dump")
    old["versions"] = fresh["versions"]
    return old


@locks_output("out_dir")  # before the index is read: two dumps never write one directory
def run_dump(
    loaded: LoadedModel,
    text: TextSource | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: DumpOptions = DumpOptions(),
    *,
    resume: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DumpOutcome:
    """Dump ``text``'s activations at ``options.sites`` x ``options.layers`` into ``out_dir``.

    ``loaded`` must have a context of at least ``options.window`` tokens.
    ``resume`` continues the dump in ``out_dir`` (same model, text and
    options), decoding only what its shards lack; without it a directory that
    already holds a dump is refused. ``should_stop`` is polled after every
    window.
    """
    t0 = time.perf_counter()
    options.validate()
    info, engine = loaded.info, loaded.engine
    src = text if isinstance(text, TextSource) else check_text(text)
    if options.window > engine.n_ctx:
        raise LcprobeError(f"windows of {options.window} tokens do not fit the context of {engine.n_ctx}")
    check_dump_memory(info, options, engine.n_batch)
    pairs = tensor_pairs(info, options)
    nodes = capture_nodes(info, pairs)
    rows_of = [nodes[info.site_name(s, layer)] for s, layer in pairs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    part = plan_part(loaded, src, options) if options.part else None
    index = _start(out, dump_index(loaded, src, options, part), resume)
    kept = int(index["n_tokens"])
    # rows [first, stop) of the whole dump's token stream are this run's; those before ``done`` are on disk
    first, stop = part["tokens"] if part else (0, None)
    done = first + kept
    outcome = DumpOutcome(out, index, False, 0, kept, 0, 0.0)
    if index["complete"]:
        outcome.already_complete = True
        return outcome

    writer = ShardWriter(out, index, [tensor_name(s, layer) for s, layer in pairs], info.n_embd,
                         index["dtype"], options.shard_tokens, part["files"][0] if part else 0)
    engine.set_sites([Site(name, info.n_embd) for name in nodes])
    n_batch = min(engine.n_batch, options.window)
    seen = 0  # tokens of the stream in finished windows
    n_windows = 0
    paragraphs = iter_paragraphs(src.path)
    tokenize = lambda s: engine.tokenize(s, add_special=False)  # noqa: E731
    for win, read in iter_windows(paragraphs, tokenize, options.window, index["window"]["bos"], options.max_tokens):
        if stop is not None and seen >= stop:
            break
        n = len(win)
        skip = max(done - seen, 0)  # leading rows of this window already in the kept shards (or before the part)
        end = n if stop is None else min(n, stop - seen)  # rows past the part's last are another part's
        if skip < end:
            outcome.tokens_decoded += _decode_window(engine, win, skip, end, n_batch, rows_of, writer)
        n_windows += max(seen, first) < seen + end  # the windows holding this dump's (or part's) rows
        seen += n
        if progress is not None:
            progress(DumpProgress(seen, outcome.tokens_decoded, writer.written, len(index["shards"]), read,
                                  src.n_bytes, options.max_tokens, time.perf_counter() - t0))
        if should_stop is not None and should_stop():
            outcome.interrupted = True
            break
    if outcome.interrupted:
        outcome.tokens_dropped = writer.fill
    else:
        if seen < done:
            raise LcprobeError(f"the text gives {seen} tokens but {out} already holds {done}; "
                               "was the text file changed?")
        writer.flush()
        index["n_windows"] = n_windows
        index["complete"] = True
        write_index(out, index)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _decode_window(engine: Any, tokens: list[int], skip: int, end: int, n_batch: int, rows_of: list[int],
                   writer: ShardWriter) -> int:
    """Decode one window from an empty cache in n_batch chunks; append its rows ``[skip, end)``.

    Batches past ``end`` are not decoded: causal attention leaves the earlier
    batches' rows unchanged. Returns the tokens decoded."""
    n = len(tokens)
    engine.clear()
    decoded = 0
    try:
        for start in range(0, min(n, end), n_batch):
            stop = min(start + n_batch, n)
            rows, _ = engine.decode(tokens[start:stop], range(start, stop), [[0]] * (stop - start),
                                    np.ones(stop - start, bool))
            decoded += stop - start
            a, b = max(skip - start, 0), min(end, stop) - start
            if a < b:
                writer.add([rows[r, a:b] for r in rows_of], tokens[start + a:start + b], range(start + a, start + b))
    finally:
        engine.clear()
    return decoded
