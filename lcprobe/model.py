"""The public Python API: :func:`load` a GGUF model, then capture, lens, score and run tasks.

Every command of the CLI is a client of the same pieces: :func:`load` opens the
model through :func:`lcprobe.llama.loader.open_model`, :meth:`Model.score` and
:meth:`Model.run_task` run the prober that ``lcprobe run`` runs, so their
numbers are the ones ``lcprobe run`` writes.

>>> import lcprobe
>>> with lcprobe.load("smollm2-135m") as model:            # doctest: +SKIP
...     acts = model.capture("The capital of France is")
...     lp = model.logit_lens(acts, positions=[-1])
...     model.top_tokens(lp[:, 0], k=3)[-1]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lcprobe.analysis.lens import LENS_MODES, Lens
from lcprobe.errors import LcprobeError, PromptTooLongError
from lcprobe.files.modelfile import ModelInfo
from lcprobe.files.plan import fmt_bytes, machine_ram
from lcprobe.interventions.apply import intervening
from lcprobe.interventions.cvec import ControlVector
from lcprobe.interventions.plan import Interventions
from lcprobe.interventions.plan import resolve as resolve_interventions
from lcprobe.llama.capture import Site
from lcprobe.llama.loader import LoadedModel, LoadOptions, open_model
from lcprobe.llama.rpc import parse_endpoints
from lcprobe.probing.activations import Activations
from lcprobe.probing.runner import Prober
from lcprobe.probing.session import ProbeOptions, RunOutcome, run_task
from lcprobe.sites import SITES, check_site, select_layers
from lcprobe.tasks.task import Item, Task, load_task

#: Share of the available RAM one capture may take before it is refused.
CAPTURE_RAM_FRACTION = 0.5


class Model:
    """A loaded GGUF model. Use :func:`load` to make one; close it (or use ``with``) to free it."""

    def __init__(self, loaded: LoadedModel, lens: str = "final-norm") -> None:
        self._lm: LoadedModel | None = loaded
        self.lens_mode = lens
        self._lens = Lens(loaded.unembed, loaded.info.n_layer, lens) if loaded.unembed is not None else None
        self._sites_checked = False

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        """Free the llama.cpp context, the capture state and the head. Safe to call twice."""
        if self._lm is not None:
            self._lm.close()
            self._lm = None
            self._lens = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._lm is None:
            return "<lcprobe.Model (closed)>"
        i = self._lm.info
        return (f"<lcprobe.Model {i.label}: {i.arch}, {i.n_layer} layers, n_embd {i.n_embd}, {i.quant}, "
                f"lens {self.lens_mode}/{self.lens_backend}>")

    @property
    def loaded(self) -> LoadedModel:
        if self._lm is None:
            raise LcprobeError("this model was closed; load it again with lcprobe.load(...)")
        return self._lm

    @property
    def info(self) -> ModelInfo:
        """The GGUF header: ``.name`` (readable), ``.path``, ``.arch``, ``.n_layer``, ``.n_embd``,
        ``.n_vocab``, ``.quant``."""
        return self.loaded.info

    @property
    def sha256(self) -> str:
        return self.loaded.sha256

    @property
    def lens_backend(self) -> str:
        return self.loaded.options.lens_backend or "none"

    @property
    def n_ctx(self) -> int:
        return self.loaded.engine.n_ctx

    # -- tokens -----------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when the model wants one and ``add_special``."""
        return self.loaded.engine.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Iterable[int]) -> str:
        """The text of ``tokens`` (special tokens such as BOS render as nothing)."""
        eng = self.loaded.engine
        return b"".join(eng.token_piece(int(t)) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.loaded.engine.token_piece(int(token)).decode("utf-8", "replace")

    # -- capture ----------------------------------------------------------------
    def capture(
        self,
        inputs: str | Sequence[int] | Sequence[str],
        sites: str | Sequence[str] = ("resid_post",),
        layers: str | int | Iterable[int] | None = None,
        logits: bool = False,
        *,
        add: Mapping[int, Any] | ControlVector | None = None,
        scale: float = 1.0,
        patch: Mapping[tuple[str, int], Any] | None = None,
        positions: Sequence[int] | None = None,
        skip: Sequence[int] | int | None = None,
    ) -> Activations | list[Activations]:
        """Decode ``inputs`` once and keep the residual stream at every (site, layer).

        ``inputs`` is a string, a token list, or a list of strings (then a list
        of :class:`Activations`, one decode each). ``sites`` from
        ``resid_pre``, ``resid_mid``, ``resid_post``; ``layers`` as ``--layers``
        (``"1:10,-1"``), one layer or a list (default: all). ``logits`` also
        keeps llama.cpp's own logits. The rows are the ones ``lcprobe run``
        captures, through the same eval callback.

        Interventions, applied inside llama.cpp's forward pass (they compose):
        ``add`` ``{layer: vector}`` added to that layer's output at every
        position (a vector of n_embd) or per position (``(n_tokens, n_embd)``),
        or a :class:`~lcprobe.interventions.ControlVector` (where llama.cpp's
        ``--control-vector`` adds it); ``scale`` multiplies the additions;
        ``patch`` ``{(site, layer): Activations or (n_tokens, n_embd)}``
        replaces those rows (activation patching); ``positions`` limits every
        edit to those token positions; ``skip`` bypasses blocks. The captured
        rows show the edited stream.
        """
        kw = dict(add=add, scale=scale, patch=patch, positions=positions, skip=skip)
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, str) for x in inputs):
            return [self._capture_one(x, sites, layers, logits, kw) for x in inputs]
        return self._capture_one(inputs, sites, layers, logits, kw)

    def _interventions(self, kw: dict[str, Any] | None, n_tokens: int | None = None) -> Interventions | None:
        if not kw or all(kw.get(k) is None for k in ("add", "patch", "positions", "skip")):
            return None
        if kw.get("add") is None and kw.get("patch") is None and kw.get("skip") is None:
            raise LcprobeError("positions says where to add or patch, but nothing is added or patched")
        return resolve_interventions(self.info, n_tokens=n_tokens, **kw)

    def _tokens_of(self, inputs: str | Sequence[int]) -> tuple[list[int], str | None]:
        if isinstance(inputs, str):
            return self.tokenize(inputs), inputs
        try:
            tokens = [int(t) for t in inputs]
        except (TypeError, ValueError):
            raise LcprobeError("capture takes a string, a list of token ids or a list of strings") from None
        n_vocab = self.info.n_vocab
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise LcprobeError(f"token id {bad[0]} is outside this model's vocabulary (0..{n_vocab - 1})")
        return tokens, None

    def _capture_one(self, inputs: str | Sequence[int], sites: str | Sequence[str],
                     layers: str | int | Iterable[int] | None, logits: bool,
                     kw: dict[str, Any] | None = None) -> Activations:
        info, eng = self.info, self.loaded.engine
        tokens, text = self._tokens_of(inputs)
        if not tokens:
            raise LcprobeError("nothing to capture: the input has no tokens")
        if len(tokens) > eng.n_ctx:
            raise PromptTooLongError(f"{len(tokens)} tokens do not fit the context of {eng.n_ctx}; "
                                     f"load the model with a larger n_ctx (at most {info.n_ctx_train} trained)")
        iv = self._interventions(kw, len(tokens))
        site_list = [sites] if isinstance(sites, str) else list(sites)
        pairs = [(check_site(s), layer) for s in site_list for layer in select_layers(layers, info.n_layer)]
        nodes: dict[str, int] = {}
        for s, layer in pairs:
            nodes.setdefault(info.site_name(s, layer), len(nodes))
        need = len(tokens) * len(nodes) * info.n_embd * 4 * 2  # rows per batch + their concatenation
        if logits:
            need += len(tokens) * info.n_vocab * 4 * 2
        _, available = machine_ram()
        if need > CAPTURE_RAM_FRACTION * available:
            raise LcprobeError(
                f"capturing {len(nodes)} tensors x {len(tokens)} tokens x {info.n_embd} floats needs "
                f"{fmt_bytes(need)}, more than half the available RAM ({fmt_bytes(available)}); capture fewer "
                "layers or sites, or a shorter text (lcprobe dump streams long texts to disk)")
        eng.set_sites([Site(n, info.n_embd) for n in nodes])
        with intervening(eng, iv):
            rows, lg = eng.decode_sequence(tokens, want_logits=logits)
        acts = Activations(tokens=tokens, n_layer=info.n_layer, text=text, logits=lg)
        for s, layer in pairs:
            acts.rows[s, layer] = rows[nodes[info.site_name(s, layer)]]
        return acts

    def logits(self, inputs: str | Sequence[int]) -> np.ndarray:
        """llama.cpp's own logits ``(n_tokens, n_vocab)`` for every position of ``inputs``."""
        acts = self._capture_one(inputs, ("resid_post",), [-1], True)
        assert acts.logits is not None
        return acts.logits

    # -- the lens ---------------------------------------------------------------
    def _need_lens(self) -> Lens:
        if self._lens is None:
            raise LcprobeError("this model was loaded without a head (lens_backend=None); the lens needs one")
        return self._lens

    def logit_lens(
        self,
        acts: Activations,
        positions: Sequence[int] | None = (-1,),
        layers: str | int | Iterable[int] | None = None,
        site: str = "resid_post",
    ) -> np.ndarray:
        """Log-probabilities of the lens at each captured layer: float32 ``(n_layers, n_positions, n_vocab)``.

        ``positions`` index tokens (negatives from the end; None = all);
        ``layers`` default to every captured layer of ``site``. With
        ``lens_backend="ggml"`` the last layer gives llama.cpp's own logits.
        """
        lens = self._need_lens()
        check_site(site)
        n = acts.n_tokens
        if positions is None:
            pos = list(range(n))
        else:
            pos = []
            for p in positions:
                q = n + int(p) if int(p) < 0 else int(p)
                if not 0 <= q < n:
                    raise LcprobeError(f"position {p} is outside the {n} captured tokens")
                pos.append(q)
        chosen = acts.layers(site) if layers is None else select_layers(layers, self.info.n_layer)
        if not chosen:
            raise LcprobeError(f"no layer of {site!r} was captured")
        out = np.empty((len(chosen), len(pos), lens.unembed.n_vocab), np.float32)
        for i, layer in enumerate(chosen):
            out[i] = lens.log_probs(acts[site, layer][pos], layer)
        return out

    def top_tokens(self, log_probs: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]] | list[tuple[str, float]]:
        """The ``k`` most probable tokens as (text, probability): per row of a ``(n, n_vocab)``
        array, or one list for a single ``(n_vocab,)`` row."""
        lp = np.asarray(log_probs, dtype=np.float32)
        if lp.ndim == 1:
            return self.top_tokens(lp[None], k)[0]  # type: ignore[return-value]
        if lp.ndim != 2:
            raise LcprobeError(f"top_tokens takes (n_vocab,) or (n, n_vocab) log-probs, got shape {lp.shape}")
        k = max(1, min(int(k), lp.shape[1]))
        out = []
        for row in lp:
            idx = np.argpartition(-row, k - 1)[:k]
            idx = idx[np.argsort(-row[idx], kind="stable")]
            out.append([(self.token_text(int(t)), float(np.exp(row[t]))) for t in idx])
        return out

    # -- scoring ----------------------------------------------------------------
    def _check_sites_once(self) -> None:
        if not self._sites_checked:
            from lcprobe.llama.engine import check_sites_exist

            check_sites_exist(self.loaded.engine)
            self._sites_checked = True

    def score(
        self,
        context: str,
        choices: Sequence[str],
        layers: str | int | Iterable[int] | None = None,
        site: str = "resid_post",
        *,
        add: Mapping[int, Any] | ControlVector | None = None,
        scale: float = 1.0,
        patch: Mapping[tuple[str, int], Any] | None = None,
        positions: Sequence[int] | None = None,
        skip: Sequence[int] | int | None = None,
    ) -> np.ndarray:
        """Summed log-probability of each choice after ``context`` at each layer: ``(n_choices, n_layers)``.

        The same tokenization split (lm-eval's), token trie, capture and lens
        as ``lcprobe run``, so the numbers are the ones its items.jsonl holds
        for this item run alone. The intervention keywords are :meth:`capture`'s
        (per-position arrays and positions index the tokens of context + choice).
        """
        iv = self._interventions(dict(add=add, scale=scale, patch=patch, positions=positions, skip=skip))
        if isinstance(choices, str) or not choices:
            raise LcprobeError("score takes a list of one or more choices")
        if site not in ("resid_post", "resid_mid"):
            raise LcprobeError(f"score supports the sites resid_post and resid_mid, not {site!r}")
        info = self.info
        chosen = select_layers(layers, info.n_layer)
        item = Item(id="0", context=context, choices=tuple(choices), correct=(0,), meta={})
        prober = Prober(self.loaded.engine, self._need_lens(), chosen, site,
                        overlap=self.loaded.options.n_gpu_layers > 0)
        with intervening(self.loaded.engine, iv):
            results = [r for group in prober.run([item]) for r in group]
        if len(results) != 1:
            raise PromptTooLongError(f"the context and its longest choice do not fit the context of {self.n_ctx}")
        return np.asarray(results[0].scores)

    def run_task(
        self,
        task: str | os.PathLike | Task,
        limit: int | None = None,
        out: str | os.PathLike | None = None,
        *,
        layers: str | None = None,
        lens: str | None = None,
        site: str = "resid_post",
        seed: int = 0,
        data: str | None = None,
        resume: bool = False,
        add: Mapping[int, Any] | ControlVector | None = None,
        scale: float = 1.0,
        patch: Mapping[tuple[str, int], Any] | None = None,
        positions: Sequence[int] | None = None,
        skip: Sequence[int] | int | None = None,
    ) -> RunOutcome:
        """Run a task exactly as ``lcprobe run`` does, writing items.jsonl and summary.json to ``out``.

        ``task`` is a built-in name, a YAML path or a :class:`~lcprobe.tasks.task.Task`.
        Without ``out`` the files go to a temporary directory that is removed
        afterwards. Returns the outcome: ``.summary``, ``.items`` (the
        items.jsonl records), ``.interrupted``, ``.stats``. The intervention
        keywords are :meth:`capture`'s; they apply to every decode, the shared
        prompt prefix included.
        """
        iv = self._interventions(dict(add=add, scale=scale, patch=patch, positions=positions, skip=skip))
        t = task if isinstance(task, Task) else load_task(str(task), data=data)
        lo = self.loaded.options
        options = ProbeOptions(
            layers=layers, lens=lens or self.lens_mode, lens_backend=lo.lens_backend or "numpy", site=site,
            limit=limit, seed=seed, n_ctx=lo.n_ctx, n_batch=lo.n_batch, n_gpu_layers=lo.n_gpu_layers,
            n_threads=lo.n_threads, n_seq_max=lo.n_seq_max, kv_type=lo.kv_type, flash_attn=lo.flash_attn,
            memory_check=lo.memory_check,
        )
        self._need_lens()
        with intervening(self.loaded.engine, iv):
            if out is not None:
                return run_task(self.loaded, t, Path(out), options, resume=resume)
            with tempfile.TemporaryDirectory(prefix="lcprobe-run-") as tmp:
                return run_task(self.loaded, t, Path(tmp), options)


def load(
    model: str | os.PathLike = "smollm2-135m",
    *,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    lens: str = "final-norm",
    lens_backend: str | None = "numpy",
    n_batch: int = 512,
    n_seq_max: int = 64,
    kv_type: str = "f16",
    flash_attn: str = "off",
    memory_check: bool = True,
    log_path: str | os.PathLike | None = None,
    rpc: Sequence[str] | str | None = None,
    tensor_split: Sequence[float] | None = None,
) -> Model:
    """Open a GGUF file (path) or a pulled catalog model (name, see ``lcprobe models list``).

    The defaults are ``lcprobe run``'s, so results match the CLI's. ``lens``
    is ``final-norm`` (logit lens) or ``raw`` (head only below the last
    layer); ``lens_backend`` ``numpy`` (float32, the dequantized head) or
    ``ggml`` (the stored head through ggml: llama.cpp's own logits), ``device``
    (the float32 head and log-softmax on the output layer's device; scoring
    brings back only the scored log-probabilities), or None
    to load no head. llama.cpp's log goes to ``log_path`` (default: the cache
    directory). ``rpc`` lists llama.cpp RPC servers (``"host:port"``, see
    ``lcprobe rpc-server``) whose devices hold the offloaded layers, split by
    ``tensor_split`` or by free memory. Raises :class:`lcprobe.LcprobeError`
    subclasses with one-line messages.
    """
    if lens not in LENS_MODES:
        raise LcprobeError(f"unknown lens '{lens}' (choose from {', '.join(LENS_MODES)})")
    options = LoadOptions(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, n_gpu_layers=n_gpu_layers,
                          n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn, lens_backend=lens_backend,
                          memory_check=memory_check, rpc=parse_endpoints(rpc),
                          tensor_split=tuple(float(x) for x in tensor_split or ()))
    return Model(open_model(model, options, log_path=log_path), lens=lens)


__all__ = ["Model", "load", "SITES"]
