"""Shared fixtures: the real catalog models and tiny synthetic LLaMA GGUFs.

`make test` pulls the real models first and sets LCPROBE_REQUIRE_MODELS=1, so
there a missing model is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _catalog_model(name: str) -> Path:
    from lcprobe.files.catalog import model_path

    path = model_path(name)
    if not path.exists():
        msg = f"model {name} not downloaded (run: lcprobe models pull {name})"
        if os.environ.get("LCPROBE_REQUIRE_MODELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _catalog_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _catalog_model("gemma3-270m")


@pytest.fixture
def paper_data_required() -> Path:
    from paths import require_paper_data

    return require_paper_data()


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory):
    """A 3-layer F32 LLaMA GGUF with random weights, and its weights."""
    from synth import SynthSpec, write_llama_gguf

    spec = SynthSpec(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=1)
    path = tmp_path_factory.mktemp("synth") / "synth-f32.gguf"
    weights = write_llama_gguf(path, spec)
    return path, spec, weights


@pytest.fixture(scope="session")
def synth_q8(tmp_path_factory, synth_model):
    from synth import load_weights, quantize

    src, spec, _ = synth_model
    dst = tmp_path_factory.mktemp("synthq") / "synth-q8_0.gguf"
    quantize(str(src), str(dst), "Q8_0")
    return dst, spec, load_weights(dst)


@pytest.fixture(autouse=True)
def _llama_log(tmp_path_factory):
    # llama.cpp's log goes to a file, as in the CLI, so test output stays readable.
    from lcprobe.llama.engine import set_llama_log

    set_llama_log(tmp_path_factory.getbasetemp() / "llama.log")
