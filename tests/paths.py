"""Where the tests find the paper's data files, without naming any machine's layout.

``$LCPROBE_DATA`` first (``make test`` sets it when the data sits beside the
checkout), then ``../shared/data/llama_analysis`` beside the checkout, then
lcprobe's cache (where ``lcprobe data pull`` puts them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def paper_data() -> Path:
    candidates = []
    if os.environ.get("LCPROBE_DATA"):
        candidates.append(Path(os.environ["LCPROBE_DATA"]).expanduser())
    candidates.append(REPO.parent / "shared" / "data" / "llama_analysis")
    from lcprobe.files.resources import cache_dir

    candidates.append(cache_dir() / "data")
    for c in candidates:
        if (c / "gsm8k_cal_mc.json").is_file():
            return c
    return candidates[0]


def require_paper_data() -> Path:
    """The data directory; under ``make test`` (LCPROBE_REQUIRE_MODELS=1) a missing one fails, else skips."""
    d = paper_data()
    if not (d / "gsm8k_cal_mc.json").is_file():
        msg = f"the paper's data files are not at {d} (run: lcprobe data pull, or set LCPROBE_DATA)"
        if os.environ.get("LCPROBE_REQUIRE_MODELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return d
