"""One writer per output directory: an exclusive ``flock`` on ``DIR/.lcprobe.lock``.

Two commands writing the same directory would interleave their items (every
id twice). The kernel releases a ``flock`` when its holder dies, however it
dies, so a lock is never stuck; the JSON record in the file (pid, command,
host, start time) only names the holder in the error, and tells the next
writer that the previous one died without cleaning up (a stale lock).

The lock is re-entrant within a process: ``suite`` and ``compare`` lock their
directory and call ``run_task``, which locks again without blocking itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import functools
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from lcprobe.errors import LcprobeError

LOCK_NAME = ".lcprobe.lock"

F = TypeVar("F", bound=Callable[..., Any])

_held: dict[str, list[Any]] = {}  # resolved dir -> [fd, depth]
_guard = threading.Lock()


class DirectoryLockedError(LcprobeError):
    """Another live process writes this directory."""


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (no record yet)"
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return (f"pid {record.get('pid')}{where} ('{record.get('command', '?')}', "
            f"started {record.get('started', '?')})")


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_command() -> str:
    """This process's command line, short, for the lock record."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


def _note(message: str) -> None:
    print(f"lcprobe: note: {message}", file=sys.stderr)


def _io_error(path: Path, exc: OSError) -> LcprobeError:
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and path.exists() and not path.is_dir():
        return LcprobeError(f"cannot write to {path}: it is a file, not a directory")
    return LcprobeError(f"cannot write to {path}: {exc.strerror or exc}")


def _acquire(directory: Path, command: str, on_stale: Callable[[str], None]) -> int:
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _io_error(directory, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            record = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                for _ in range(5):  # the holder may be between flock and writing its record
                    record = _read_record(fd)
                    if record:
                        break
                    time.sleep(0.02)
                os.close(fd)
                raise DirectoryLockedError(
                    f"{directory} is being written by {_describe(record)}; wait for it to finish "
                    "or use another -o/--output directory"
                ) from None
            os.close(fd)
            raise LcprobeError(f"cannot lock {directory}: {exc.strerror or exc}") from exc
        # The previous holder unlinks the file on release: if we locked an
        # unlinked inode, someone else may hold the new file; start over.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    old = _read_record(fd)
    if old:
        alive = old.get("host") not in (None, socket.gethostname()) or _pid_alive(old.get("pid"))
        state = "no longer holds it" if alive else "is no longer running"
        on_stale(f"took over the lock of {directory} left by {_describe(old)}, which {state}")
    record = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as exc:
        _release_fd(path, fd)
        raise _io_error(directory, exc) from exc
    return fd


def _release_fd(path: Path, fd: int) -> None:
    # Unlink while still holding the lock, so a waiting process re-checks the inode.
    try:
        os.unlink(path)
    except OSError:
        pass  # read-only or already gone: the empty flock is enough
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def lock_dir(directory: str | os.PathLike, command: str | None = None,
             on_stale: Callable[[str], None] = _note) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if missing) for the block.

    Raises :class:`DirectoryLockedError` naming the holder when another live
    process has it; a lock left by a dead process is taken over and reported
    through ``on_stale`` (default: one line on stderr).
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _io_error(d, exc) from exc
    key = str(d.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            _held[key] = [_acquire(d, command or current_command(), on_stale), 1]
    try:
        yield d
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release_fd(d / LOCK_NAME, entry[0])


def lock_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the live process holding ``directory``'s lock, or None."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_record(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def locks_output(param: str = "out_dir") -> Callable[[F], F]:
    """Decorate a function that writes the directory passed as ``param``: it runs holding that lock."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            directory = sig.bind(*args, **kwargs).arguments[param]
            with lock_dir(directory):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
