"""Activation dumps on disk: safetensors shards plus an index, written and read back.

A dump directory holds::

    index.json                      what was dumped, how, and the finished shards
    shard-00000.safetensors         tensors "<site>.<layer>" (n_tokens, n_embd) in float16
    shard-00001.safetensors         or float32, "tokens" (int32) and "positions" (int32,
    ...                             the position in its window: 0 starts a window)

Every shard holds exactly ``shard_tokens`` rows except the last one of a
finished dump, so shard k starts at token ``k * shard_tokens`` and a resumed
dump cuts its shards where an uninterrupted one would. A shard is written to a
temporary name and renamed, then ``index.json`` is rewritten atomically: a
shard not listed in the index does not exist as far as readers and
``--resume`` are concerned.

A part of a dump (``lcprobe dump --shard I/N``; the shard files above are
another thing) holds the files of a contiguous range of the whole dump's,
under the whole dump's names and with its ``first_token`` values; its index
has a ``part`` record (``index``, ``count``, ``files`` and ``tokens`` as
``[start, stop)``, ``total_tokens``, ``total_windows``, ``total_files``) and
reads back as its own rows. :func:`merge_dump` joins the parts.

This module reads and writes files only; it never imports llama.cpp (reading a
dump works on a machine without a llama.cpp build).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic
from lcprobe.sites import check_site, layer_index

INDEX = "index.json"
FORMAT = "lcprobe-dump"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 4096  # tokens per shard: 4096 x 30 layers x 576 x 2 bytes = 142 MB for SmolLM2

#: --dtype values (and accepted spellings) -> numpy dtype name
DTYPES = {"float16": "float16", "f16": "float16", "fp16": "float16",
          "float32": "float32", "f32": "float32", "fp32": "float32"}

#: Index keys that must be equal for --resume to continue a dump.
RESUME_KEYS = ("model_sha256", "sites", "layers", "dtype", "text_sha256", "window", "shard_tokens",
               "max_tokens", "decode", "part")
#: Index keys every part of one dump must agree on (``decode`` without n_gpu_layers, a per-machine setting).
PART_KEYS = ("format_version", "model_sha256", "n_layer", "n_embd", "sites", "layers", "tensors", "dtype",
             "text_sha256", "text_bytes", "window", "decode", "shard_tokens", "max_tokens")


def check_dtype(dtype: str) -> str:
    """The canonical name (float16 or float32) of a --dtype value."""
    name = DTYPES.get(str(dtype).lower())
    if name is None:
        raise LcprobeError(f"unknown --dtype '{dtype}' (choose float16 or float32)")
    return name


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def tensor_name(site: str, layer: int) -> str:
    return f"{site}.{layer}"


def write_shard(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> int:
    """Write one shard under a temporary name, flush it to disk, rename it; return its size.

    No metadata that changes between runs goes in, so a resumed dump's shards
    are byte-identical to an uninterrupted one's.
    """
    from safetensors.numpy import save_file

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
              metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files 0600; a dump is data like any other
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p.stat().st_size


def write_index(out_dir: str | os.PathLike, index: dict[str, Any]) -> None:
    # Lists of numbers and names on one line each: the layer and tensor lists are long.
    text = re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s*\]",
                  lambda m: "[" + re.sub(r",\n\s+", ", ", m.group(1)) + "]", json.dumps(index, indent=1))
    write_atomic(Path(out_dir) / INDEX, text + "\n")


def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``DIR/index.json``, checked to be an lcprobe dump of a version this code reads."""
    d = Path(out_dir).expanduser()
    p = d / INDEX
    if not d.is_dir():
        raise LcprobeError(f"{d}: no such directory")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LcprobeError(f"{d}: no {INDEX} here; not an lcprobe dump directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcprobeError(f"{p}: unreadable ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LcprobeError(f"{p}: not an lcprobe dump index")
    if index.get("format_version") != FORMAT_VERSION:
        raise LcprobeError(f"{p}: dump format version {index.get('format_version')} "
                           f"(this lcprobe reads version {FORMAT_VERSION})")
    return index


def resume_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`RESUME_KEYS` on which two indexes differ (the window's explanatory note aside)."""
    def key(index: dict[str, Any], k: str) -> Any:
        v = index.get(k)
        return {a: b for a, b in v.items() if a != "note"} if isinstance(v, dict) else v

    return [k for k in RESUME_KEYS if key(old, k) != key(new, k)]


@dataclass(frozen=True)
class Shard:
    """One shard file: ``shard.tokens``, ``shard.positions``, ``shard["resid_post", 5]``."""

    path: Path
    first_token: int
    n_tokens: int
    n_layer: int

    def _get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                return f.get_tensor(name)
        except FileNotFoundError:
            raise LcprobeError(f"{self.path}: shard file missing") from None
        except Exception as exc:  # safetensors raises its own error types for torn or foreign files
            raise LcprobeError(f"{self.path}: cannot read '{name}' ({exc})") from None

    @property
    def tokens(self) -> np.ndarray:
        return self._get("tokens")

    @property
    def positions(self) -> np.ndarray:
        return self._get("positions")

    def __getitem__(self, key: tuple[str, int]) -> np.ndarray:
        site, layer = _key(key, self.n_layer)
        return self._get(tensor_name(site, layer))


def _key(key: object, n_layer: int) -> tuple[str, int]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise KeyError(f"index a dump with (site, layer), e.g. dump['resid_post', 5]; got {key!r}")
    site, layer = key
    return check_site(str(site)), layer_index(int(layer), n_layer)


class Dump:
    """A dump directory read back: ``.index``, ``.tokens``, ``dump["resid_post", 5]``, ``.iter_shards()``.

    ``dump[site, layer]`` loads that tensor of every shard into one
    ``(n_tokens, n_embd)`` array (the other tensors are not read); for dumps
    larger than memory, walk :meth:`iter_shards`. An interrupted dump reads as
    the shards it finished (``.complete`` is False).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.index = read_index(self.path)
        self.n_layer = int(self.index["n_layer"])
        self.shards: list[Shard] = []
        for entry in self.index["shards"]:
            p = self.path / entry["file"]
            if not p.is_file():
                raise LcprobeError(f"{p}: shard listed in {INDEX} is missing")
            self.shards.append(Shard(p, int(entry["first_token"]), int(entry["n_tokens"]), self.n_layer))

    def __repr__(self) -> str:
        return (f"<lcprobe dump {self.path}: {self.n_tokens} tokens in {len(self.shards)} shards, "
                f"{', '.join(self.sites)} x {len(self.layers)} layers, {self.dtype}>")

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def sites(self) -> list[str]:
        return list(self.index["sites"])

    @property
    def layers(self) -> list[int]:
        return [int(v) for v in self.index["layers"]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"])

    @property
    def n_embd(self) -> int:
        return int(self.index["n_embd"])

    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    def __len__(self) -> int:
        return self.n_tokens

    def __contains__(self, key: object) -> bool:
        try:
            site, layer = _key(key, self.n_layer)
        except (KeyError, LcprobeError, TypeError, ValueError):
            return False
        return site in self.sites and layer in self.layers

    def _concat(self, read: Any, width: int | None, dtype: np.dtype) -> np.ndarray:
        shape = (self.n_tokens,) if width is None else (self.n_tokens, width)
        out = np.empty(shape, dtype)
        pos = 0
        for s in self.shards:
            part = read(s)
            if part.shape != (s.n_tokens, *shape[1:]):
                raise LcprobeError(f"{s.path}: holds shape {part.shape}, {INDEX} says {(s.n_tokens, *shape[1:])}")
            out[pos:pos + s.n_tokens] = part
            pos += s.n_tokens
        return out

    @property
    def tokens(self) -> np.ndarray:
        """Every dumped token id, in order (int32)."""
        return self._concat(lambda s: s.tokens, None, np.dtype(np.int32))

    @property
    def positions(self) -> np.ndarray:
        """Each token's position in its window (0 = the window's first token, its BOS if any)."""
        return self._concat(lambda s: s.positions, None, np.dtype(np.int32))

    def __getitem__(self, key: tuple[str, int]) -> np.ndarray:
        site, layer = _key(key, self.n_layer)
        if site not in self.sites or layer not in self.layers:
            raise LcprobeError(f"({site!r}, {layer}) is not in this dump (sites {', '.join(self.sites)}; "
                               f"layers {_layer_text(self.layers)})")
        return self._concat(lambda s: s[site, layer], self.n_embd, self.dtype)

    def iter_shards(self) -> Iterator[Shard]:
        return iter(self.shards)


def _layer_text(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}:{layers[-1]}"
    return ",".join(str(v) for v in layers)


def read_dump(path: str | os.PathLike) -> Dump:
    """Open a directory written by ``lcprobe dump`` (see :class:`Dump`)."""
    return Dump(path)


# --- joining the parts of a dump ----------------------------------------------------------


def _part_key(index: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in PART_KEYS:
        v = index.get(k)
        if k == "window" and isinstance(v, dict):
            v = {a: b for a, b in v.items() if a != "note"}
        elif k == "decode" and isinstance(v, dict):
            v = {a: b for a, b in v.items() if a != "n_gpu_layers"}
        out[k] = v
    part = index["part"]
    out.update({k: part.get(k) for k in ("total_tokens", "total_windows", "total_files")})
    out["llama-cpp-python version"] = index.get("versions", {}).get("llama_cpp_python")
    return out


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link where the file system allows, else a copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge_dump(dirs: list[Path], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Join the parts of one dump into ``out_dir``: their files (linked or copied, byte-identical to
    the whole dump's) and the index.json the whole dump writes; return that index. Reads files only."""
    from lcprobe.results.merge import MergeError, check_indices, shard_range

    out = Path(out_dir)
    parts = []
    for d in dirs:
        index = read_index(d)
        part = index.get("part")
        if not isinstance(part, dict):
            raise MergeError(f"{d} is not a shard (dumped without --shard I/N)")
        if not index.get("complete"):
            raise MergeError(f"shard {part['index']}/{part['count']} in {d} is incomplete; "
                             "finish it with the same command plus --resume")
        parts.append((Path(d), index))
    parts.sort(key=lambda p: p[1]["part"]["index"])
    d0, first = parts[0]
    key0 = _part_key(first)
    for d, index in parts[1:]:
        key = _part_key(index)
        diff = [k for k in key0 if key[k] != key0[k]]
        if diff:
            raise MergeError(f"{d} and {d0} are not shards of one dump: different {', '.join(diff)}")
    check_indices([(d, int(i["part"]["index"]), int(i["part"]["count"])) for d, i in parts])
    size, n_files = int(first["shard_tokens"]), int(first["part"]["total_files"])
    entries = []
    for d, index in parts:
        part = index["part"]
        f0, f1 = shard_range(n_files, int(part["index"]), int(part["count"]))
        names = [shard_name(k) for k in range(f0, f1)]
        if [e["file"] for e in index["shards"]] != names or part["files"] != [f0, f1]:
            raise MergeError(f"{d} does not hold the shard files {f0}..{f1 - 1} that part "
                             f"{part['index']}/{part['count']} of {n_files} should")
        for e in index["shards"]:
            p = d / e["file"]
            if not p.is_file() or p.stat().st_size != e["bytes"]:
                raise MergeError(f"{p}: listed in {INDEX} but missing or of another size")
            if e["first_token"] != sum(x["n_tokens"] for x in entries):
                raise MergeError(f"{p} starts at token {e['first_token']}, the parts before it end at "
                                 f"{sum(x['n_tokens'] for x in entries)}")
            entries.append(dict(e, path=p))
    total = int(first["part"]["total_tokens"])
    if sum(e["n_tokens"] for e in entries) != total:
        raise MergeError(f"the parts hold {sum(e['n_tokens'] for e in entries)} tokens, the dump has {total}")
    if any(out.resolve() == d.resolve() for d, _ in parts):
        raise MergeError(f"-o {out} is one of the shards; write the merge elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    # No index while the files change: a reader or --resume sees no dump rather than a mixed one.
    (out / INDEX).unlink(missing_ok=True)
    for e in entries:
        _link(e.pop("path"), out / e["file"])
    merged = {k: v for k, v in first.items() if k != "part"}
    merged.update(shards=entries, n_tokens=total, n_windows=first["part"]["total_windows"], complete=True)
    write_index(out, merged)
    return merged
