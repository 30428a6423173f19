"""Where lcprobe's shipped files are: the built-in tasks and the model catalog.

In a checkout (and an editable install) they are the repository's top-level
``tasks/`` and ``models/``; a wheel carries copies under ``lcprobe/_data/``
(installed by CMakeLists.txt). Pulled models go next to the catalog in a
checkout, and to the user's cache directory in a wheel install, never into
site-packages.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_ROOT = PACKAGE_DIR.parent
INSTALLED_DATA = PACKAGE_DIR / "_data"


def shipped_dir(name: str) -> Path:
    """``tasks`` or ``models``: the installed copy when there is one, else the checkout's."""
    installed = INSTALLED_DATA / name
    return installed if installed.is_dir() else SOURCE_ROOT / name


def is_checkout() -> bool:
    return not (INSTALLED_DATA / "models").is_dir() and (SOURCE_ROOT / "models" / "catalog.yaml").is_file()


def cache_dir() -> Path:
    """``$LCPROBE_CACHE``, else ``~/.cache/lcprobe``."""
    return Path(os.environ.get("LCPROBE_CACHE") or Path.home() / ".cache" / "lcprobe").expanduser()
