"""Resumable HTTP downloads, sha256 of files, and the one cache of known digests.

Models (:mod:`lcprobe.files.catalog`) and the paper's data
(:mod:`lcprobe.files.datafiles`) both download into a ``.part`` file that a
later run resumes; the digest is computed while writing. Digests of whole
files are cached in ``<cache>/sha256.json`` by path, size and mtime, so a
40 GB model is read once, and read-only directories need no sidecar files.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lcprobe import __version__
from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic
from lcprobe.files.resources import cache_dir

#: ``progress(stage, done, total)``: stage is "download", "extract", "hash"
#: (reading an existing partial download) or "verify"; done/total are bytes,
#: total is None when unknown.
Progress = Callable[[str, int, int | None], None]

CHUNK = 1 << 20
HTTP_TIMEOUT = 60.0  # seconds without data before a download is abandoned


class DownloadError(LcprobeError):
    """A download failed; the message says whether running again resumes it."""


# --- hashing -------------------------------------------------------------------


def _hash_into(h: Any, path: str | os.PathLike[str], chunk: int, progress: Progress | None, stage: str) -> int:
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(stage, done, total)
    return done


def sha256_file(path: str | os.PathLike[str], chunk: int = CHUNK, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time (progress stage "verify"); never cached."""
    h = hashlib.sha256()
    _hash_into(h, path, chunk, progress, "verify")
    return h.hexdigest()


class HashingWriter:
    """Appends to a file while hashing, so the digest costs no extra read."""

    def __init__(self, f: BinaryIO, progress: Progress | None, stage: str, total: int | None,
                 done: int = 0, hasher: Any = None) -> None:
        self.f, self.progress, self.stage, self.total, self.done = f, progress, stage, total, done
        # a resumed download continues the hash of the bytes already on disk
        self.hash = hasher if hasher is not None else hashlib.sha256()

    def copy_from(self, src: BinaryIO) -> None:
        while block := src.read(CHUNK):
            self.f.write(block)
            self.hash.update(block)
            self.done += len(block)
            if self.progress is not None:
                self.progress(self.stage, self.done, self.total)


# --- the digest cache ------------------------------------------------------------


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


def _load_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _key(path: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    p = Path(path).resolve()
    return str(p), p.stat()


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The digest recorded for ``path`` if the file has not changed (size, mtime) since."""
    key, st = _key(path)
    rec = _load_cache().get(key)
    try:
        if rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
            return str(rec["sha256"])
    except (KeyError, TypeError):
        pass
    return None


def remember_sha256(path: str | os.PathLike[str], digest: str) -> None:
    """Record ``digest`` as the sha256 of ``path`` as it is now."""
    key, st = _key(path)
    cache = {k: v for k, v in _load_cache().items() if os.path.exists(k)}  # forget deleted files
    cache[key] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_cache_file(), json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time


def file_sha256(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """sha256 of a file: from the cache when the file is unchanged, else hashed once and recorded."""
    digest = cached_sha256(path)
    if digest is None:
        digest = sha256_file(path, progress=progress)
        remember_sha256(path, digest)
    return digest


# --- resumable HTTP ----------------------------------------------------------------


def part_path(path: Path) -> Path:
    """Where a download of ``path`` collects its bytes until it is verified."""
    return path.with_name(path.name + ".part")


def _content_range_total(header: str | None) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    m = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", (header or "").strip())
    return int(m.group(1)) if m else None


def fetch_resumable(url: str, part: Path, *, size: int | None = None, progress: Progress | None = None,
                    timeout: float = HTTP_TIMEOUT, again: str = "run the command again",
                    _retry: bool = True) -> str:
    """Download ``url`` into ``part``, resuming what is there with a ``Range`` request.

    Returns the sha256 of the whole ``part``. ``size`` (when known) is checked
    against the server's length before any byte is written. A failure raises
    :class:`DownloadError`; ``again`` completes its message with how to resume
    (e.g. "run the pull again"). The caller checks the digest and renames.
    """
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()  # longer than the real file: not a prefix of it
        offset = 0
    # Hash what is already there before asking for the rest, so the connection
    # does not sit idle (and time out) while a large prefix is read.
    prefix_hash = hashlib.sha256()
    if offset:
        _hash_into(prefix_hash, part, CHUNK, progress, "hash")
    if size is not None and offset == size:
        return prefix_hash.hexdigest()  # an earlier run got every byte
    headers = {"User-Agent": f"lcprobe/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            if _content_range_total(exc.headers.get("Content-Range")) == offset:
                return prefix_hash.hexdigest()  # the .part already holds the whole file
            if _retry:  # the .part is not a prefix of what the server has
                part.unlink(missing_ok=True)
                return fetch_resumable(url, part, size=size, progress=progress, timeout=timeout, again=again,
                                       _retry=False)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise DownloadError(f"download of {url} failed: {reason}") from None

    with resp:
        if offset and resp.status == 206:
            content_range = resp.headers.get("Content-Range") or ""
            start = re.match(r"bytes\s+(\d+)-", content_range)
            if start is None or int(start.group(1)) != offset:
                raise DownloadError(f"download of {url} failed: the server resumed at the wrong offset")
            total = _content_range_total(content_range)
            hasher, done, mode = prefix_hash, offset, "ab"
        else:
            # A 200 answer to a Range request is the whole file: start over.
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            hasher, done, mode = hashlib.sha256(), 0, "wb"
        if total is not None and size is not None and total != size:
            raise DownloadError(f"download of {url} failed: the server has {total} bytes, expected {size}")
        if total is None:
            total = size
        with open(part, mode) as f:
            writer = HashingWriter(f, progress, "download", total, done, hasher)
            try:
                writer.copy_from(resp)
            except (OSError, http.client.HTTPException) as exc:  # e.g. IncompleteRead, timeouts
                raise DownloadError(f"download of {url} interrupted after {writer.done} bytes "
                                    f"({exc.__class__.__name__}); {again} to resume") from None
    if total is not None and writer.done != total:
        if writer.done > total:
            part.unlink()
        raise DownloadError(f"download of {url} stopped at {writer.done} of {total} bytes; {again} to resume")
    return writer.hash.hexdigest()


__all__ = [
    "CHUNK",
    "DownloadError",
    "HashingWriter",
    "Progress",
    "cached_sha256",
    "fetch_resumable",
    "file_sha256",
    "part_path",
    "remember_sha256",
    "sha256_file",
]
