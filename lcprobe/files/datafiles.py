"""The paper's probing data: fetched from its public repository at a pinned commit.

``lcprobe data pull`` downloads the files Chen et al. released with their
code (github.com/nuochenpku/LLaMA_Analysis, folder ``data/``) into
``$LCPROBE_DATA`` or ``~/.cache/lcprobe/data`` (where :mod:`lcprobe.tasks`
looks for them). Every file is checked against the size and sha256 recorded
here (digests cached by :mod:`lcprobe.files.download`); a file already
present with the right digest is left alone, so a pull into a complete (even
read-only) directory writes nothing there. A download goes to ``<name>.part``
and resumes it with an HTTP ``Range`` request; only a file whose digest
matches is renamed to its final name.

The reasoning-error variants (``gsm8k_reason_mc_pure*.json``) are in the
repository but were not available to record digests for, so they are not
pulled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lcprobe.errors import LcprobeError
from lcprobe.files.download import HTTP_TIMEOUT, DownloadError, fetch_resumable, file_sha256, part_path, remember_sha256

REPOSITORY = "nuochenpku/LLaMA_Analysis"
#: The repository's last commit (2024-01-13); its data/ folder has not changed since the first commit.
COMMIT = "f968fd9738710e2919bb3ea1ae5580cb7d8553de"
BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/data/"

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
    from lcprobe.tasks.task import data_dirs

    return data_dirs()[0]


@dataclass(frozen=True)
class FileState:
    file: DataFile
    path: Path
    state: str  # "ok", "missing", "partial" (a .part waits to be resumed), "wrong size", "wrong sha256"


def file_state(f: DataFile, directory: Path) -> FileState:
    path = directory / f.name
    if not path.is_file():
        part = part_path(path)
        return FileState(f, path, "partial" if part.is_file() else "missing")
    if path.stat().st_size != f.size:
        return FileState(f, path, "wrong size")
    if file_sha256(path) != f.sha256:
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
         force: bool = False, files: Sequence[DataFile] = FILES, timeout: float = HTTP_TIMEOUT) -> PullOutcome:
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
                part_path(state.path).unlink(missing_ok=True)
            _fetch(f, base_url + f.name, state.path, progress, timeout)
        except PermissionError as exc:
            raise LcprobeError(f"cannot write {exc.filename or d}: permission denied "
                               "(pass --dir or set LCPROBE_DATA to a writable directory)") from None
        fetched.append(f.name)
    return PullOutcome(d, fetched, present)


def _fetch(f: DataFile, url: str, dest: Path, progress: Progress | None, timeout: float) -> None:
    part = part_path(dest)

    def report(stage: str, done: int, total: int | None) -> None:
        if progress is not None and stage == "download":
            progress(f.name, done, f.size)

    try:
        digest = fetch_resumable(url, part, size=f.size, progress=report, timeout=timeout,
                                 again="run `lcprobe data pull` again")
    except DownloadError as exc:
        raise LcprobeError(str(exc)) from None
    if digest != f.sha256:
        part.unlink()
        raise LcprobeError(f"{f.name}: sha256 mismatch (got {digest}, expected {f.sha256}); the download was removed")
    os.replace(part, dest)
    remember_sha256(dest, digest)
