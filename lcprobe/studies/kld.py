"""KL divergence of quantized models from a base model, at the output and at every layer.

The text is scored as ``llama-perplexity`` scores it (``tools/perplexity/perplexity.cpp``):
tokenized whole with the model's special tokens, cut into ``n_ctx``-token chunks
(as many whole chunks as fit, at most ``chunks``; at least two chunks' worth of
tokens is required), each chunk decoded from an empty cache at positions
0..n_ctx-1 with its first token replaced by BOS when the model adds one, and
only the second half scored: the logits at positions n_ctx/2 .. n_ctx-2 against
the next token, ``n_ctx - 1 - n_ctx/2`` tokens per chunk.

*Final layer.* llama.cpp's own logits of both models. Per token: the NLL of the
next token under each, KL(base || quantized) over the whole vocabulary, Δp =
p_q(token) - p_base(token), and whether the argmaxes agree; the statistics are
:func:`lcprobe.analysis.kld.final_stats` (llama-perplexity's definitions).
Two things llama-perplexity approximates and lcprobe does not: it stores the
base's log-probabilities coded in 16 bits (steps of (max-min logit)/65535,
min clamped to max-16, about 2.4e-4 nats) and its KL sum leaves out the tokens
whose base log-probability is below -16. lcprobe keeps the base's
log-probabilities in float32 and sums KL over every token in float64, so its
numbers differ from llama-perplexity's by those approximations (and by
nothing else when both run the same llama.cpp).

*Every layer.* Under the logit lens (each model's own final norm and head, float32
unless ``lens_backend="ggml"``), per selected layer: KLD of base layer l against
quantized layer l (mean, median, 99th percentile), same top token, RMS Δp of the
next token, and the residual's relative L2 error and cosine after the block
(``l_out``) and after attention (``resid_mid``). These run on at most
``layer_tokens`` scored positions, evenly spaced in each chunk (the lens is a
vocabulary-wide product per token and layer); the final block always uses every
token.

*Streaming.* One llama.cpp model is loaded at a time. The base runs first and
writes, per chunk, its float32 log-probabilities of the scored tokens and its
residual rows at the sampled positions to ``DIR/.kld_base/`` (memory-mapped;
the size is known in advance and checked against the free disk space); then
each quantized model runs the same chunks against those files. Only per-token
scalars stay in memory. The base's final norm and head (not the model) are kept
for the per-layer lens. The store is deleted at the end.

*Shards.* ``shard=(i, n)`` (``--shard I/N``) scores the i-th of n contiguous
ranges of the chunks (:func:`lcprobe.results.merge.shard_range` over the whole
text's chunk count). A chunk is decoded from an empty cache whatever else runs,
and the per-layer positions are sampled from the whole run's chunk count, so
a shard's per-token values are the unsharded run's, bit for bit. Its kld.json
describes its own chunks and carries a ``shard`` record; ``kld-values.npz``
keeps the per-token values, from which ``lcprobe merge`` recomputes every
statistic (means, uncertainties, medians, percentiles) exactly as the
unsharded run computes them.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcprobe.analysis import kld as stats
from lcprobe.analysis.lens import Lens, Unembed, kl_rows, log_softmax
from lcprobe.errors import LcprobeError
from lcprobe.files.catalog import resolve_model
from lcprobe.files.modelfile import ModelInfo, read_model_info, vocab_fingerprint
from lcprobe.files.plan import fmt_bytes
from lcprobe.results.kld import KLD_VALUES, write_kld, write_values
from lcprobe.results.lock import locks_output
from lcprobe.results.merge import shard_range
from lcprobe.sites import parse_layers

KLD_VERSION = 1
DEFAULT_CTX = 512
DEFAULT_LAYER_TOKENS = 2048
STORE_DIR = ".kld_base"
# Lens rows per vocabulary-wide product: 64 x 262144 float32 is 64 MiB.
LENS_BLOCK_ROWS = 64
# Keep this much disk free beyond the store.
DISK_MARGIN = 1 << 30

#: ``progress(label, chunks done, chunks total, running final stats or None)``
Progress = Callable[[str, int, int, "dict[str, float] | None"], None]

#: Per-token arrays of the final block, in :func:`lcprobe.analysis.kld.final_stats`'s argument order.
FINAL_VALUES = ("nll_q", "nll_base", "kld", "dp", "same_top")
#: Per-row arrays of one per-layer row, in :func:`lcprobe.analysis.kld.layer_stats`'s argument order.
LAYER_VALUES = ("kld", "dp", "same", "rel", "cos", "rel_mid", "cos_mid")
# Options that may differ between the machines running a kld's shards without changing a number.
PER_MACHINE = ("shard", "n_threads", "n_gpu_layers", "memory_check")


@dataclass(frozen=True)
class KldOptions:
    n_ctx: int = DEFAULT_CTX
    chunks: int | None = None  # None: every whole chunk of the text
    layers: str | None = None  # --layers of the per-layer view (default all)
    layer_tokens: int = DEFAULT_LAYER_TOKENS  # 0: final block only
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int | str = 0  # or "auto", resolved by the loader
    lens_backend: str = "numpy"
    memory_check: bool = True
    shard: tuple[int, int] | None = None  # (i, n): the i-th of n ranges of chunks; 'lcprobe merge' joins them
    # llama.cpp's default, which llama-perplexity runs: each chunk is decoded alone from an empty
    # cache, so the prober's batch-invariance reason for "off" does not apply, and the numbers stay
    # llama-perplexity's (off moves SmolLM2 Q4_0's PPL by 0.5%)
    flash_attn: str = "auto"

    def validate(self) -> None:
        if self.shard is not None:
            i, n = self.shard
            if not 1 <= i <= n:
                raise LcprobeError(f"--shard {i}/{n}: I must be between 1 and N")
        if self.n_ctx < 4:
            raise LcprobeError(f"-c/--ctx-size must be at least 4 for kld (half of each chunk is scored), "
                               f"got {self.n_ctx}")
        if self.chunks is not None and self.chunks < 1:
            raise LcprobeError(f"--chunks must be at least 1, got {self.chunks}")
        if self.layer_tokens < 0:
            raise LcprobeError(f"--layer-tokens cannot be negative, got {self.layer_tokens}")
        if self.n_batch < 1:
            raise LcprobeError(f"-b/--batch-size must be at least 1, got {self.n_batch}")


@dataclass(frozen=True)
class Text:
    """The text to score and where it came from."""

    text: str
    path: str
    sha256: str


def read_text(path: str | Path | None = None) -> Text:
    """A text file read as llama-perplexity's ``-f`` reads it (one trailing newline dropped), or, with
    no path, the default corpus (:func:`lcprobe.tasks.corpus.default_documents`, blank-line separated)."""
    if path is None:
        from lcprobe.tasks.corpus import default_documents, find_data_dir

        d = find_data_dir()
        text = "\n\n".join(default_documents(d))
        return Text(text, f"default corpus ({d})", hashlib.sha256(text.encode("utf-8")).hexdigest())
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise LcprobeError(f"{p}: text file not found") from None
    except OSError as exc:
        raise LcprobeError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LcprobeError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise LcprobeError(f"{p}: no text")
    return Text(text, str(p.resolve()), hashlib.sha256(raw).hexdigest())


# --- chunks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunks:
    """The text's tokens cut as llama-perplexity cuts them."""

    tokens: np.ndarray  # every token of the text (int32)
    n_ctx: int
    n_chunk: int
    bos: int | None  # replaces each chunk's first token

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        """Scored tokens per chunk."""
        return self.n_ctx - 1 - self.first

    def inputs(self, i: int) -> np.ndarray:
        t = self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx].copy()
        if self.bos is not None:
            t[0] = self.bos
        return t

    def targets(self, i: int) -> np.ndarray:
        """The next tokens of the scored positions (the text's, never the BOS)."""
        s = i * self.n_ctx + self.first + 1
        return self.tokens[s:s + self.n_scored]


def make_chunks(tokens: Sequence[int], n_ctx: int, chunks: int | None, bos: int | None) -> Chunks:
    if len(tokens) < 2 * n_ctx:
        raise LcprobeError(f"the text tokenizes to {len(tokens)} tokens; a context of {n_ctx} needs at least "
                           f"{2 * n_ctx} (as llama-perplexity); give a longer --text or a smaller -c")
    n_max = len(tokens) // n_ctx
    return Chunks(np.asarray(tokens, np.int32), n_ctx, n_max if chunks is None else min(chunks, n_max), bos)


def sample_positions(n_scored: int, n_chunk: int, layer_tokens: int) -> np.ndarray:
    """Indices (into a chunk's scored tokens) the per-layer lens runs on: evenly spaced, the
    same in every chunk, at most ``layer_tokens`` over all chunks (at least one per chunk)."""
    if layer_tokens <= 0:
        return np.zeros(0, np.int64)
    per = max(1, min(n_scored, layer_tokens // n_chunk))
    return np.unique(np.linspace(0, n_scored - 1, per).round().astype(np.int64))


def bos_token(engine: Any, info: ModelInfo) -> int | None:
    """The BOS id when the model adds one (what ``llama_vocab_get_add_bos`` says), else None."""
    if not info.add_bos:
        return None
    with_special = engine.tokenize("", add_special=True)
    if len(with_special) != 1:
        raise LcprobeError(f"{info.path.name}: adds {len(with_special)} special tokens to an empty text; "
                           "llama-perplexity's scheme needs exactly a BOS")
    return int(with_special[0])


# --- the base's files ------------------------------------------------------------


class BaseStore:
    """The base's scored log-probabilities ``(n_chunk, n_scored, n_vocab)`` and residual rows
    ``(n_chunk, 2 x n_layers, n_sample, n_embd)`` (block outputs, then after attention), float32
    memmaps under ``DIR/.kld_base``."""

    def __init__(self, out_dir: Path, n_chunk: int, n_scored: int, n_vocab: int, n_sites: int,
                 n_sample: int, n_embd: int) -> None:
        self.dir = out_dir / STORE_DIR
        self.shapes = {"logprobs": (n_chunk, n_scored, n_vocab), "rows": (n_chunk, n_sites, n_sample, n_embd)}
        self._mm: dict[str, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(4 * math.prod(s) for s in self.shapes.values())

    def check_disk(self) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir.parent).free
        if self.nbytes + DISK_MARGIN > free:
            raise LcprobeError(
                f"the base's log-probabilities and rows need {fmt_bytes(self.nbytes)} on disk in "
                f"{self.dir.parent}, only {fmt_bytes(free)} are free; use fewer --chunks, fewer --layers or "
                "--layer-tokens")

    def create(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        for name, shape in self.shapes.items():
            self._mm[name] = np.lib.format.open_memmap(self.dir / f"{name}.npy", mode="w+", dtype=np.float32,
                                                       shape=shape)

    def flush(self) -> None:
        for mm in self._mm.values():
            mm.flush()

    def __getitem__(self, name: str) -> np.ndarray:
        return self._mm[name]

    def remove(self) -> None:
        self._mm.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- one model over the chunks ---------------------------------------------------


def _sites(info: ModelInfo, layers: Sequence[int]) -> list[Any]:
    from lcprobe.llama.capture import Site

    return ([Site(info.site_name("resid_post", l), info.n_embd) for l in layers]
            + [Site(info.site_name("resid_mid", l), info.n_embd) for l in layers])


def decode_chunk(engine: Any, chunks: Chunks, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk i from an empty cache: (captured rows ``(n_sites, n_scored, d)``, llama.cpp's logits
    ``(n_scored, n_vocab)``) of the scored positions."""
    tokens = chunks.inputs(i)
    n = len(tokens)
    outputs = np.zeros(n, bool)
    outputs[chunks.first:n - 1] = True
    engine.clear()
    rows, logits = [], []
    for s in range(0, n, engine.n_batch):
        e = min(n, s + engine.n_batch)
        r, lg = engine.decode(tokens[s:e], range(s, e), [[0]] * (e - s), outputs[s:e], want_logits=True)
        if outputs[s:e].any():
            rows.append(r)
            logits.append(lg)
    engine.clear()
    return np.concatenate(rows, axis=1), np.concatenate(logits)


def _open(path: Path, options: KldOptions, lens_backend: str | None, n_sites: int) -> Any:
    from lcprobe.llama.loader import LoadOptions, open_model

    load = LoadOptions(n_ctx=options.n_ctx, n_batch=min(options.n_batch, options.n_ctx), n_seq_max=1,
                       n_gpu_layers=options.n_gpu_layers, n_threads=options.n_threads, flash_attn=options.flash_attn,
                       lens_backend=lens_backend, memory_check=options.memory_check,
                       layers=None if n_sites else "1")
    return open_model(path, load)


@dataclass
class LayerAcc:
    """Per-row values of one layer, over all chunks."""

    kld: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)
    same: list[np.ndarray] = field(default_factory=list)
    rel: list[np.ndarray] = field(default_factory=list)
    cos: list[np.ndarray] = field(default_factory=list)
    rel_mid: list[np.ndarray] = field(default_factory=list)
    cos_mid: list[np.ndarray] = field(default_factory=list)

    def values(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(getattr(self, k)) for k in LAYER_VALUES}


def model_stats(values: dict[str, np.ndarray], layers: Sequence[int]) -> tuple[dict[str, float] | None,
                                                                                 list[dict[str, Any]]]:
    """kld.json's ``final`` and ``layers`` of one model from its per-token values (keys as in
    kld-values.npz without the model prefix: ``kld``, ``l0.kld``, ...); None for ``final`` below two
    tokens. The one place both an unsharded run and a merge compute them, so they agree bit for bit."""
    final = None
    if len(values["kld"]) >= 2:
        final = stats.final_stats(*(values[k] for k in FINAL_VALUES))
    rows = [stats.layer_stats(layer, *(values[f"l{j}.{k}"] for k in LAYER_VALUES)) for j, layer in enumerate(layers)]
    return final, rows


def shard_identity(result: dict[str, Any]) -> dict[str, Any]:
    """What the kld.json of every shard of one run must agree on, by the name an error gives it."""
    sh = result["shard"]
    ident = {
        "kld version": result.get("kld_version"),
        "base model sha256": result["base"]["sha256"],
        "models (sha256)": [m["sha256"] for m in result["models"]],
        "text sha256": result["text"]["sha256"], "chunk size (-c)": result["text"]["n_ctx"],
        "chunk count": sh["n_chunk"],
        "lens": {k: result["lens"].get(k) for k in ("mode", "backend", "layers")},
        "llama-cpp-python version": result.get("versions", {}).get("llama_cpp_python"),
    }
    opts = sh["options"]
    ident.update({f"option {k}": v for k, v in opts.items() if k not in PER_MACHINE})
    return ident


def lens_compare(lens_b: Lens, lens_q: Lens, hb: np.ndarray, hq: np.ndarray, layer: int,
                 targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL(base lens || quantized lens), Δp of the targets and argmax agreement, per row."""
    kld, dp, same = [], [], []
    for r0 in range(0, len(hb), LENS_BLOCK_ROWS):
        r1 = min(len(hb), r0 + LENS_BLOCK_ROWS)
        lb = lens_b.log_probs(hb[r0:r1], layer)
        lq = lens_q.log_probs(hq[r0:r1], layer)
        t = np.asarray(targets[r0:r1], np.int64)
        rows = np.arange(r1 - r0)
        kld.append(kl_rows(lb, lq))
        dp.append(np.exp(lq[rows, t].astype(np.float64)) - np.exp(lb[rows, t].astype(np.float64)))
        same.append(np.argmax(lb, axis=1) == np.argmax(lq, axis=1))
        del lb, lq
    return np.concatenate(kld), np.concatenate(dp), np.concatenate(same)


# --- the study -------------------------------------------------------------------


@dataclass
class KldPlan:
    base: ModelInfo
    quants: list[ModelInfo]
    layers: list[int]
    per_layer: list[bool]  # per quantized model: same depth and width as the base


def plan_models(models: Sequence[str | Path], layers: str | None) -> KldPlan:
    if len(models) < 2:
        raise LcprobeError("kld needs a base model and at least one quantized model: -m BASE -m QUANT")
    infos = [read_model_info(resolve_model(str(m))) for m in models]
    base, quants = infos[0], infos[1:]
    fp = vocab_fingerprint(base.path)
    for q in quants:
        if q.n_vocab != base.n_vocab or vocab_fingerprint(q.path) != fp:
            raise LcprobeError(f"{q.path.name} does not share {base.path.name}'s vocabulary; KL divergence "
                               "needs the same tokens")
    per_layer = [q.n_layer == base.n_layer and q.n_embd == base.n_embd for q in quants]
    return KldPlan(base, quants, parse_layers(layers, base.n_layer), per_layer)


@locks_output("out_dir")
def run_kld(models: Sequence[str | Path], out_dir: str | Path, text: Text,
            options: KldOptions = KldOptions(), progress: Progress | None = None) -> dict[str, Any]:
    """Score ``text`` with the base (``models[0]``) and each quantized model; write and return kld.json."""
    from lcprobe.llama.engine import llama_cpp_version
    from lcprobe.studies.quantize import type_mix

    from lcprobe import __version__

    options.validate()
    out = Path(out_dir)
    # a previous shard's values would otherwise sit next to a kld.json they do not belong to
    (out / KLD_VALUES).unlink(missing_ok=True)
    plan = plan_models(models, options.layers)
    layers = plan.layers if options.layer_tokens > 0 else []
    base_info = plan.base
    n_sites = 2 * len(layers)
    report = progress or (lambda *a: None)

    # -- the base: tokens, chunks, its log-probabilities and rows on disk
    t0 = time.perf_counter()
    with _open(base_info.path, options, None, n_sites) as lm:
        eng = lm.engine
        tokens = eng.tokenize(text.text, add_special=True)
        chunks = make_chunks(tokens, options.n_ctx, options.chunks, bos_token(eng, base_info))
        span = chunk_span(chunks.n_chunk, options.shard)
        # positions from the whole run's chunk count: a shard samples what the unsharded run samples
        sample = sample_positions(chunks.n_scored, chunks.n_chunk, len(layers) and options.layer_tokens)
        store = BaseStore(out, len(span), chunks.n_scored, eng.n_vocab, n_sites, len(sample),
                          base_info.n_embd)
        store.check_disk()
        store.create()
        base_sha = lm.sha256
        try:
            eng.set_sites(_sites(base_info, layers))
            report(base_info.label, 0, len(span), None)
            for s, i in enumerate(span):
                rows, logits = decode_chunk(eng, chunks, i)
                store["logprobs"][s] = log_softmax(logits, out=logits)
                if n_sites:
                    store["rows"][s] = rows[:, sample]
                report(base_info.label, s + 1, len(span), None)
            store.flush()
        except BaseException:
            store.remove()
            raise
    base_seconds = time.perf_counter() - t0
    base_mix = type_mix(base_info)
    result: dict[str, Any] = {
        "kld_version": KLD_VERSION,
        "base": {"path": str(base_info.path), "sha256": base_sha, "quant": base_info.quant,
                 "bpw": round(base_mix.bits_per_weight, 4), "arch": base_info.arch, "n_layer": base_info.n_layer,
                 "n_embd": base_info.n_embd, "n_vocab": base_info.n_vocab, "seconds": round(base_seconds, 2)},
        "text": {"path": text.path, "sha256": text.sha256, "n_ctx": chunks.n_ctx, "chunks": len(span),
                 "tokens_scored": len(span) * chunks.n_scored},
        "lens": {"mode": "final-norm", "backend": options.lens_backend, "layers": layers,
                 "tokens_per_layer": len(span) * len(sample)},
        "versions": {"lcprobe": __version__, "llama_cpp_python": llama_cpp_version()},
        "models": [],
    }
    values: dict[str, np.ndarray] = {}
    if options.shard:
        result["shard"] = {"index": options.shard[0], "count": options.shard[1], "chunks": [span.start, span.stop],
                           "n_chunk": chunks.n_chunk, "n_models": len(plan.quants),
                           "options": _options_record(options), "complete": False}
    try:
        base_lens = None
        if layers and any(plan.per_layer):
            base_lens = Lens(Unembed.from_model(base_info, backend=options.lens_backend,
                                                n_threads=options.n_threads), base_info.n_layer)
        for k, (q, comparable) in enumerate(zip(plan.quants, plan.per_layer)):
            entry, vals = _run_quant(q, text, comparable and base_lens is not None, layers, chunks, span, sample,
                                     store, base_lens, options, report)
            entry["bpw"] = round(type_mix(q).bits_per_weight, 4)
            result["models"].append(entry)
            values.update({f"m{k}.{name}": v for name, v in vals.items()})
            write_kld(out, result)
    finally:
        store.remove()
        if base_lens is not None:
            base_lens.unembed.close()
    if options.shard:
        # the values before the record that says they are complete
        write_values(out, values)
        result["shard"]["complete"] = True
    write_kld(out, result)
    return result


def chunk_span(n_chunk: int, shard: tuple[int, int] | None) -> range:
    """The chunks a run scores: all of them, or a shard's contiguous range (refused when some shard of
    ``n`` would get no chunk: every shard's kld.json holds statistics)."""
    if shard is None:
        return range(n_chunk)
    i, n = shard
    if n > n_chunk:
        raise LcprobeError(f"--shard {i}/{n}: the text gives {n_chunk} chunk(s) of this -c, fewer than {n} "
                           f"shards; use at most {n_chunk}")
    return range(*shard_range(n_chunk, i, n))


def _options_record(options: KldOptions) -> dict[str, Any]:
    rec = asdict(options)
    rec["shard"] = list(options.shard) if options.shard else None
    return rec


def _run_quant(info: ModelInfo, text: Text, per_layer: bool, layers: list[int], chunks: Chunks, span: range,
               sample: np.ndarray, store: BaseStore, base_lens: Lens | None, options: KldOptions,
               report: Progress) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    t0 = time.perf_counter()
    use = layers if per_layer else []
    acc = {k: [] for k in ("nll_base", "nll_q", "kld", "dp", "same_top")}
    layer_acc = [LayerAcc() for _ in use]
    with _open(info.path, options, options.lens_backend if use else None, 2 * len(use)) as lm:
        eng = lm.engine
        mine = np.asarray(eng.tokenize(text.text, add_special=True), np.int32)
        if len(mine) != len(chunks.tokens) or not np.array_equal(mine, chunks.tokens):
            raise LcprobeError(f"{info.path.name} tokenizes the text differently from the base")
        if bos_token(eng, info) != chunks.bos:
            raise LcprobeError(f"{info.path.name} and the base differ in their BOS token")
        lens_q = Lens(lm.unembed, info.n_layer) if use else None
        eng.set_sites(_sites(info, use))
        report(info.label, 0, len(span), None)
        for s, i in enumerate(span):
            rows, logits = decode_chunk(eng, chunks, i)
            logp_q = log_softmax(logits, out=logits)
            logp_b = np.asarray(store["logprobs"][s])
            targets = chunks.targets(i)
            for k, v in stats.token_stats(logp_b, logp_q, targets).items():
                acc[k].append(v)
            del logp_b, logp_q, logits
            if use:
                base_rows = np.asarray(store["rows"][s])
                t_sample = targets[sample]
                n = len(use)
                for li, layer in enumerate(use):
                    a = layer_acc[li]
                    hq, hq_mid = rows[li][sample], rows[n + li][sample]
                    hb, hb_mid = base_rows[li], base_rows[n + li]
                    k, dp, same = lens_compare(base_lens, lens_q, hb, hq, layer, t_sample)
                    a.kld.append(k)
                    a.dp.append(dp)
                    a.same.append(same)
                    rel, cos = stats.residual_error(hb, hq)
                    a.rel.append(rel)
                    a.cos.append(cos)
                    rel, cos = stats.residual_error(hb_mid, hq_mid)
                    a.rel_mid.append(rel)
                    a.cos_mid.append(cos)
            running = None
            done = sum(len(x) for x in acc["kld"])
            if done >= 2:
                running = stats.final_stats(*(np.concatenate(acc[k]) for k in
                                              ("nll_q", "nll_base", "kld", "dp", "same_top")))
            report(info.label, s + 1, len(span), running)
        sha = lm.sha256
    values = {k: np.concatenate(v) for k, v in acc.items()}
    for j, a in enumerate(layer_acc):
        values.update({f"l{j}.{k}": v for k, v in a.values().items()})
    final, rows = model_stats(values, use)
    entry = {
        "path": str(info.path), "quant": info.quant, "bpw": None, "sha256": sha, "n_layer": info.n_layer,
        "final": final, "layers": rows, "seconds": round(time.perf_counter() - t0, 2),
    }
    return entry, values
