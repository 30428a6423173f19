"""Replace a file atomically: readers see the old or the new content, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary sibling, flush it to disk, then rename over ``path``.

    The fsync matters: after a power loss a renamed but unflushed file can be
    empty, which is worse than the old one.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(tmp, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
