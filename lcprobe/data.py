"""The paper's probing data: fetched from its public repository at a pinned commit.

``lcprobe data pull`` downloads the files Chen et al. released with their
code (github.com/nuochenpku/LLaMA_Analysis, folder ``data/``) into
``$LCPROBE_DATA`` or ``~/.cache/lcprobe/data`` (where :mod:`lcprobe.tasks`
looks for them). Every file is checked against the size and sha256 recorded
here; a file already present with the right digest is left alone, so a pull
into a complete (even read-only) directory writes nothing. A download goes to
``<name>.part`` and resumes it with an HTTP ``Range`` request; only a file
whose digest matches is renamed to its final name.

The reasoning-error variants (``gsm8k_reason_mc_pure*.json``) are in the
repository but were not available to record digests for, so they are not
pulled.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import LcprobeError

REPOSITORY = "nuochenpku/LLaMA_Analysis"
#: The repository's last commit (2024-01-13); its data/ folder has not changed since the first commit.
COMMIT = "f968fd9738710e2919bb3ea1ae5580cb7d8553de"
BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/data/"

_CHUNK = 1 << 16
_TIMEOUT = 60  # seconds without data before a download is abandoned

#: ``progress(name, done_bytes, total_bytes)`` while a file downloads.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DataFile:
    name: str
    size: int
    sha256: str
    tasks: tuple[str, ...]  # the built-in tasks that read it


# Sizes and digests of the files at COMMIT (their git blob ids match that tree).
FILES: tuple[DataFile, ...] = (
    DataFile("gsm8k_cal_mc.json", 750984,
             "e6e2d18e339d6559b5a08d6f8b361204bc137c40d6ff55da067af6193133cc3c", ("mps-cal",)),
    DataFile("gsm8k_cal_mc_Chinese.json", 993368,
             "b69ca26ba93908071fddfa541e39afdd9f5a3c88367affdace6463480e590498", ("xmps-cal-zh",)),
    DataFile("gsm8k_cal_mc_French.json", 1062383,
             "9bae0dcb386effad6c19687fe611aebc0f137f8e5b4f74859ad56af497b744d4", ("xmps-cal-fr",)),
    DataFile("gsm8k_cal_mc_Spanish.json", 1051613,
             "5247391bd8e5c71a75e341f61f8e2101d36217497c9d91fd5bee7511e5c3c2ac", ("xmps-cal-es",)),
    DataFile("gsm8k_cal_mc_Thai.json", 1566829,
             "e71e94718cd2083bd96e1f3b09fd030ddfd6a439586f145b59aec04b29446d53", ("xmps-cal-th",)),
    DataFile("reclor_val.json", 545706,
             "49a43973d7cf00d5e0d645daad864efca8e10497ced241f32afa4bd260233159", ("reclor",)),
    DataFile("TruthfulQA.csv", 476230,
             "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d", ("truthfulqa-mc",)),
    DataFile("mlama_short.tsv", 448092,
             "c7f2f2db2f16990bb846713bbcad0c8229398b508c9205b0c454ecf3496886cc", ("lama",)),
)


def default_dir() -> Path:
    """Where a pull goes by default: ``$LCPROBE_DATA`` if set, else ``~/.cache/lcprobe/data``."""
    from .tasks import data_dirs

    return data_dirs()[0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileState:
    file: DataFile
    path: Path
    state: str  # "ok", "missing", "partial" (a .part waits to be resumed), "wrong size", "wrong sha256"


def file_state(f: DataFile, directory: Path) -> FileState:
    path = directory / f.name
    if not path.is_file():
        part = _part(path)
        return FileState(f, path, "partial" if part.is_file() else "missing")
    if path.stat().st_size != f.size:
        return FileState(f, path, "wrong size")
    if sha256_of(path) != f.sha256:
        return FileState(f, path, "wrong sha256")
    return FileState(f, path, "ok")


def status(directory: str | Path | None = None) -> list[FileState]:
    d = Path(directory).expanduser() if directory is not None else default_dir()
    return [file_state(f, d) for f in FILES]


@dataclass
class PullOutcome:
    directory: Path
    fetched: list[str]
    present: list[str]


def pull(directory: str | Path | None = None, base_url: str = BASE_URL, progress: Progress | None = None,
         force: bool = False, files: Sequence[DataFile] = FILES, timeout: float = _TIMEOUT) -> PullOutcome:
    """Make every data file present and verified in ``directory``; download only what is not."""
    d = Path(directory).expanduser() if directory is not None else default_dir()
    if not base_url.endswith("/"):
        base_url += "/"
    fetched, present = [], []
    for f in files:
        state = file_state(f, d)
        if state.state == "ok" and not force:
            present.append(f.name)
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            if state.state in ("wrong size", "wrong sha256") or force:
                state.path.unlink(missing_ok=True)
            if force:
                _part(state.path).unlink(missing_ok=True)
            _fetch(f, base_url + f.name, state.path, progress, timeout)
        except PermissionError as exc:
            raise LcprobeError(f"cannot write {exc.filename or d}: permission denied "
                               "(pass --dir or set LCPROBE_DATA to a writable directory)") from None
        fetched.append(f.name)
    return PullOutcome(d, fetched, present)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _fetch(f: DataFile, url: str, dest: Path, progress: Progress | None, timeout: float,
           _retry: bool = True) -> None:
    part = _part(dest)
    offset = part.stat().st_size if part.is_file() else 0
    if offset > f.size:  # longer than the real file: not a prefix of it
        part.unlink()
        offset = 0
    if offset < f.size:
        headers = {"User-Agent": f"lcprobe/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset and _retry:  # the server disagrees about the .part: start over
                part.unlink(missing_ok=True)
                return _fetch(f, url, dest, progress, timeout, _retry=False)
            raise LcprobeError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            raise LcprobeError(f"download of {url} failed: {reason}") from None
        with resp:
            if offset and resp.status == 206:
                m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range") or "")
                if m is None or int(m.group(1)) != offset:
                    raise LcprobeError(f"download of {url} failed: the server resumed at the wrong offset")
                mode, done = "ab", offset
            else:  # a 200 to a Range request is the whole file
                mode, done = "wb", 0
            with open(part, mode) as out:
                try:
                    while block := resp.read(_CHUNK):
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(f.name, done, f.size)
                except (OSError, http.client.HTTPException) as exc:  # timeouts, IncompleteRead
                    raise LcprobeError(f"download of {url} interrupted after {done} bytes "
                                       f"({exc.__class__.__name__}); run `lcprobe data pull` again to resume") from None
    got = part.stat().st_size
    if got != f.size:
        if got > f.size:
            part.unlink()
        raise LcprobeError(f"download of {url} stopped at {got} of {f.size} bytes; "
                           "run `lcprobe data pull` again to resume")
    digest = sha256_of(part)
    if digest != f.sha256:
        part.unlink()
        raise LcprobeError(f"{f.name}: sha256 mismatch (got {digest}, expected {f.sha256}); the download was removed")
    os.replace(part, dest)
