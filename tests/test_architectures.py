"""Every architecture lcprobe accepts, checked against llama.cpp on a tiny random model of it.

For each key of ``ARCHITECTURES`` (an architecture added to the table without a
writer in tests/arch_models.py fails here), a model with the architecture's real
tensor set is written and loaded through lcprobe, and:

- the ggml lens at the last layer is llama.cpp's own log-softmax;
- the numpy (float32) lens picks llama.cpp's top token at >= 99% of positions;
- resid_pre / resid_post are captured at every layer, resid_mid where the graph
  names the residual after attention, and the layer-1 input is the (scaled)
  embedding row.

Measured on this build (120 tokens, logits std ~4): the ggml lens differs from
llama.cpp's log-probabilities by at most 6.4e-6 (F32, F16 and Q8_0 heads alike;
GGML_TOL = 1e-4). The numpy lens differs by at most 1.3e-5 on the F32 heads,
6.2e-3 on qwen3's F16 head and 0.14 on mistral3's Q8_0 head (llama.cpp rounds
the head's activations to Q8_0); it picks llama.cpp's top token at every
position except three of mistral3's, all near-ties (top-2 gap < 0.05): 0.975
of all positions, 0.991 of the decisive ones, the measure `lcprobe check` uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import lcprobe
from lcprobe.errors import ModelError
from lcprobe.files.modelfile import ARCHITECTURES, read_model_info
from lcprobe.probing.activations import Activations

try:
    import arch_models
    import synth
except ImportError:  # tests/ imported as a package
    from tests import arch_models, synth  # type: ignore[no-redef]

GGML_TOL = 1e-4
ARGMAX_AGREEMENT = 0.99
# per head type, ~2-8x the largest measured: beyond that the numpy lens would read
# the head differently from llama.cpp, not round differently
NUMPY_TOL = {"F32": 1e-4, "F16": 0.02, "Q8_0": 0.3}

# 120 tokens of the synthetic vocabulary: long enough that one near-tie flipped by
# rounding still leaves >= 99% agreement, and longer than the sliding windows (8)
TEXT = ("The capital of France is Paris and the capital of Italy is Rome. What is two plus three? "
        "It is five. Who was in Berlin when the sun was blue and the moon was red? "
        "Q: Which city is the capital of Spain? answer: Madrid. one two three four five six seven eight "
        "nine ten hello world 12 + 34 = 46. How many days are in a week? seven. Where is the sky? "
        "The sky is blue at day and the moon is at night. 1 2 3 4 5 6 7 8 9 10 11 12 13")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))


def _sites(arch: str) -> list[str]:
    """Every residual site the architecture's graph names."""
    return ["resid_pre", "resid_post"] + (["resid_mid"] if ARCHITECTURES[arch].mid else [])


@dataclass
class Loaded:
    written: arch_models.ArchModel
    model: lcprobe.Model
    acts: Activations  # every site at every layer, with llama.cpp's logits

    @property
    def sites(self) -> list[str]:
        return _sites(self.written.arch)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def written(arch: str, tmp_path_factory: pytest.TempPathFactory) -> arch_models.ArchModel:
    if arch not in arch_models.WRITERS:
        pytest.fail(f"architecture '{arch}' is accepted by lcprobe but tests/arch_models.py has no writer for it")
    return arch_models.write_arch_model(arch, tmp_path_factory.mktemp(arch) / f"{arch}.gguf")


def _load(written: arch_models.ArchModel, backend: str) -> Iterator[Loaded]:
    m = lcprobe.load(str(written.path), n_ctx=256, n_threads=2, lens_backend=backend)
    try:
        yield Loaded(written, m, m.capture(TEXT, sites=_sites(written.arch), logits=True))
    finally:
        m.close()


@pytest.fixture(scope="module")
def ggml(written: arch_models.ArchModel) -> Iterator[Loaded]:
    yield from _load(written, "ggml")


@pytest.fixture(scope="module")
def numpy_lens(written: arch_models.ArchModel) -> Iterator[Loaded]:
    yield from _load(written, "numpy")


def test_ggml_lens_is_llama_cpp_at_the_last_layer(ggml: Loaded) -> None:
    acts = ggml.acts
    assert acts.n_tokens >= 100
    lp = ggml.model.logit_lens(acts, positions=None, layers=[-1])[0]
    ref = _log_softmax(acts.logits)
    assert np.isfinite(ref).all()
    diff = float(np.abs(lp - ref).max())
    assert diff < GGML_TOL, f"{ggml.written.arch}: ggml lens vs llama.cpp max |diff| {diff:.2e}"
    assert (lp.argmax(-1) == acts.logits.argmax(-1)).all()


def test_numpy_lens_picks_llama_cpp_top_token(numpy_lens: Loaded) -> None:
    acts, info = numpy_lens.acts, numpy_lens.model.info
    lp = numpy_lens.model.logit_lens(acts, positions=None, layers=[-1])[0]
    z = acts.logits
    diff = np.abs(lp - _log_softmax(z))
    assert diff.max() < NUMPY_TOL[info.head_type], \
        f"{info.arch}: numpy lens max |diff| {diff.max():.2e} ({info.head_type} head)"
    agree = lp.argmax(-1) == z.argmax(-1)
    # lcprobe check's rule: a position whose top two llama.cpp logits are closer
    # than twice the mean lens/llama.cpp difference is a near-tie either side may break
    top2 = np.sort(np.partition(z, -2, axis=-1)[:, -2:], axis=-1)
    decisive = top2[:, 1] - top2[:, 0] > 2 * diff.mean()
    assert agree[decisive].mean() >= ARGMAX_AGREEMENT, \
        f"{info.arch}: numpy lens top token agrees at {agree[decisive].mean():.3f} of decisive positions"
    if info.head_type in ("F32", "F16"):
        # a float head's rounding (f16 activations at most) is far below the top-2 gaps:
        # every position counts
        assert agree.mean() >= ARGMAX_AGREEMENT, f"{info.arch}: numpy lens top token agrees at {agree.mean():.3f}"


def test_every_site_is_captured_at_every_layer(ggml: Loaded) -> None:
    acts, info = ggml.acts, ggml.model.info
    n, d = acts.n_tokens, info.n_embd
    for site in ggml.sites:
        assert acts.layers(site) == list(range(1, info.n_layer + 1)), site
        for layer in range(1, info.n_layer + 1):
            rows = acts[site, layer]
            assert rows.shape == (n, d) and rows.dtype == np.float32 and np.isfinite(rows).all(), (site, layer)
    for layer in range(1, info.n_layer):
        np.testing.assert_array_equal(acts["resid_pre", layer + 1], acts["resid_post", layer])
    if "resid_mid" in ggml.sites:
        # the residual after attention: neither the block's input nor its output
        for layer in range(1, info.n_layer + 1):
            mid = acts["resid_mid", layer]
            assert not np.allclose(mid, acts["resid_pre", layer]) and not np.allclose(mid, acts["resid_post", layer])
    else:
        with pytest.raises(ModelError, match="no named residual after attention"):
            ggml.model.capture(TEXT, sites="resid_mid")


def test_layer_one_input_is_the_scaled_embedding(ggml: Loaded) -> None:
    # the embed node exists (else the capture above raised) and holds what block 1 reads
    acts, w = ggml.acts, synth.load_weights(ggml.written.path)
    expected = w["token_embd.weight"][acts.tokens] * np.float32(ggml.written.embed_scale)
    np.testing.assert_allclose(acts["resid_pre", 1], expected, rtol=1e-6, atol=1e-6)


def test_the_lens_reads_the_head_extras_llama_cpp_applies(written: arch_models.ArchModel) -> None:
    info = read_model_info(written.path)
    softcap = {"gemma2": 15.0}.get(written.arch, 0.0)
    scale = {"granite": 4.0}.get(written.arch, 1.0)
    assert (info.logit_softcap, info.logit_scale) == (softcap, scale)


def test_head_keys_of_a_graph_that_ignores_them_are_ignored(tmp_path) -> None:
    # llama's graph neither soft-caps nor scales its logits, whatever the header says
    path = arch_models.write_llama_like(
        "llama", tmp_path / "llama-keys.gguf",
        extra_keys=lambda w: (w.add_final_logit_softcapping(5.0), w.add_logit_scale(4.0))).path
    info = read_model_info(path)
    assert (info.logit_softcap, info.logit_scale) == (0.0, 1.0)
    with lcprobe.load(str(path), n_ctx=256, n_threads=2, lens_backend="ggml") as m:
        acts = m.capture(TEXT, layers=[-1], logits=True)
        lp = m.logit_lens(acts, positions=None, layers=[-1])[0]
    assert np.abs(lp - _log_softmax(acts.logits)).max() < GGML_TOL


# -- what lcprobe refuses -----------------------------------------------------------------

def test_an_architecture_outside_the_table_is_refused_by_name(tmp_path) -> None:
    path = arch_models.write_llama_like("starcoder2", tmp_path / "starcoder2.gguf").path
    with pytest.raises(ModelError, match=r"architecture 'starcoder2' is not supported by lcprobe \(supported: "):
        lcprobe.load(str(path))


def test_a_head_bias_is_refused_by_the_lens_not_the_capture(tmp_path) -> None:
    path = arch_models.write_qwen2_with_output_bias(tmp_path / "qwen2-bias.gguf").path
    for backend in ("numpy", "ggml"):
        with pytest.raises(ModelError, match=r"output\.bias"):
            lcprobe.load(str(path), n_ctx=64, n_threads=2, lens_backend=backend)
    with lcprobe.load(str(path), n_ctx=64, n_threads=2, lens_backend=None) as m:
        assert m.capture("hello world", layers=[-1])["resid_post", -1].shape[1] == 64


def test_gemma2_without_a_softcap_key_is_capped_at_30(tmp_path) -> None:
    # llama.cpp's gemma2 graph always soft-caps, at 30 when the header is silent
    path = arch_models.write_gemma2(tmp_path / "gemma2-default-cap.gguf", final_softcap=None).path
    assert read_model_info(path).logit_softcap == 30.0
    with lcprobe.load(str(path), n_ctx=256, n_threads=2, lens_backend="ggml") as m:
        acts = m.capture(TEXT, layers=[-1], logits=True)
        lp = m.logit_lens(acts, positions=None, layers=[-1])[0]
    assert np.abs(lp - _log_softmax(acts.logits)).max() < GGML_TOL
