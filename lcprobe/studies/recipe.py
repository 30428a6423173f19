"""The best type per weight group for a size: a recipe from a sensitivity run.

Predicted final KLD of a mix = sum over groups of the KLD that group causes
alone at its type (``lcprobe sensitivity``). A group measured at type m and
asked about type t is scaled by its weights' round-trip error:
``kld(t) = kld(m) * err(t) / err(m)`` (KLD grows with the square of a small
perturbation, and so does the error); a group the run did not measure gets
``err(t)`` times the median KLD-per-error of measured groups of its kind.

The size counts every tensor: bits of all tensor data / all weights, as
gguf-py reads the file (norms included). Choosing one type per group under a
byte budget is a multiple-choice knapsack; :func:`choose` solves it by
dynamic programming over the budget cut into 100k steps (sizes rounded up,
so never over budget) and then spends what the rounding left on the
upgrades with the best KLD saved per byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lcprobe.errors import LcprobeError

DEFAULT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")


class RecipeError(LcprobeError):
    """A sensitivity file, type list or size target a recipe cannot use."""


def read_sensitivity(path: str | os.PathLike) -> dict:
    """sensitivity.json from a directory (or the file itself), checked."""
    p = Path(path).expanduser()
    f = p / "sensitivity.json" if p.is_dir() else p
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"no sensitivity.json in {p} (run lcprobe sensitivity -o {p} first)") from None
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{f}: not a readable sensitivity.json ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != "lcprobe.sensitivity" or not data.get("groups"):
        raise RecipeError(f"{f} is not an lcprobe sensitivity result")
    return data


def tensor_bits_per_weight(path: str | os.PathLike) -> float:
    """Bits of all tensor data / all weights of a GGUF, as gguf-py reads it."""
    from lcprobe.files.modelfile import open_reader

    r = open_reader(path)
    return 8.0 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


@dataclass
class Option:
    qtype: str
    nbytes: int
    kld: float  # predicted
    measured: bool


@dataclass
class Choice:
    group: str
    tensor: str
    kind: str
    layer: int | None
    n_params: int
    options: list[Option]
    pick: int = 0

    @property
    def chosen(self) -> Option:
        return self.options[self.pick]


@dataclass
class Recipe:
    choices: list[Choice]
    fixed_bytes: int  # tensors outside the groups, as stored in the base
    n_weights: int  # every tensor's elements
    target_bpw: float

    @property
    def nbytes(self) -> int:
        return self.fixed_bytes + sum(c.chosen.nbytes for c in self.choices)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_weights

    @property
    def predicted_kld(self) -> float:
        return float(sum(c.chosen.kld for c in self.choices))

    def types(self) -> dict[str, str]:
        return {c.tensor: c.chosen.qtype for c in self.choices}

    def mix(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.chosen.qtype] = out.get(c.chosen.qtype, 0) + c.n_params
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def main_type(self) -> str:
        """The quantized type holding most weights (llama-quantize's positional type)."""
        quantized = {t: n for t, n in self.mix().items() if t not in ("F32", "F16", "BF16")}
        return max(quantized, key=quantized.get) if quantized else "Q8_0"

    def tensor_type_args(self) -> list[str]:
        """``--tensor-type`` arguments for llama-quantize: one anchored pattern per group.

        llama-quantize lower-cases the pattern and applies the first regex that
        matches anywhere in the name, so each is anchored (``blk.3`` must not
        match ``blk.30``).
        """
        return [f"--tensor-type '^{c.tensor.replace('.', chr(92) + '.')}$={c.chosen.qtype.lower()}'"
                for c in self.choices]

    def as_dict(self) -> dict:
        return {"target_bpw": self.target_bpw, "bits_per_weight": self.bits_per_weight, "nbytes": self.nbytes,
                "predicted_kld": self.predicted_kld, "mix": self.mix(),
                "groups": [{"group": c.group, "tensor": c.tensor, "type": c.chosen.qtype,
                            "predicted_kld": c.chosen.kld, "measured": c.chosen.measured} for c in self.choices]}


def choose(choices: list[Choice], budget: int, units: int = 100_000) -> None:
    """Set each choice's ``pick`` to minimise the summed KLD with summed bytes <= ``budget``."""
    cheapest = sum(min(o.nbytes for o in c.options) for c in choices)
    if cheapest > budget:
        raise RecipeError(f"even the smallest type everywhere needs {cheapest:,} bytes for the groups, "
                          f"over the {budget:,} the target leaves; raise --target-bpw or add smaller --types")

    # Dynamic programming over the budget in ``units`` steps, each option's
    # bytes rounded up: exact for the rounded sizes and never over budget.
    unit = max(1, -(-budget // units))
    cap = budget // unit
    best = np.zeros(cap + 1)  # least KLD with at most b units, for the groups so far
    backs = []
    for c in choices:
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, np.int16)
        for i, o in enumerate(c.options):
            w = -(-o.nbytes // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + o.kld
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        best = new
        backs.append(arg)
    if not np.isfinite(best[cap]):
        raise RecipeError(f"no choice of types fits {budget:,} bytes for the groups once sizes are rounded; "
                          "raise --target-bpw")
    b = cap
    for c, arg in zip(reversed(choices), reversed(backs)):
        c.pick = int(arg[b])
        b -= -(-c.chosen.nbytes // unit)
    # spend the rest: best KLD saved per extra byte first, while it fits
    used = sum(c.chosen.nbytes for c in choices)
    while True:
        top = None
        for c in choices:
            cur = c.chosen
            for i, o in enumerate(c.options):
                extra = o.nbytes - cur.nbytes
                gain = cur.kld - o.kld
                if gain > 0 and 0 < extra <= budget - used:
                    rate = gain / extra
                    if top is None or rate > top[0]:
                        top = (rate, c, i, extra)
        if top is None:
            return
        _, c, i, extra = top
        c.pick = i
        used += extra


def plan_recipe(
    base: str | os.PathLike,
    sensitivity: dict,
    target_bpw: float,
    types: Sequence[str] = DEFAULT_TYPES,
    imatrix: dict[str, np.ndarray] | None = None,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Recipe:
    """The recipe for ``base`` at <= ``target_bpw`` bits per weight (see the module doc)."""
    from lcprobe.files.modelfile import open_reader
    from lcprobe.llama.quantizer import can_hold, ggml_type, round_trip, row_size, tensor_values
    from lcprobe.studies.sensitivity import FLOAT_BASES, weight_error, weight_groups

    if not target_bpw > 0:
        raise RecipeError(f"--target-bpw must be positive, got {target_bpw}")
    qtypes = [ggml_type(t) for t in types]
    reader = open_reader(base)
    tensors = {t.name: t for t in reader.tensors}
    groups = weight_groups(base)
    measured = {g["tensor"]: g for g in sensitivity["groups"]}
    unknown = sorted(set(measured) - set(tensors))
    if unknown:
        raise RecipeError(f"the sensitivity run was made on another model: {Path(base).name} has no {unknown[0]}")
    odd = [g for g in groups if g.base_type not in FLOAT_BASES]
    if odd:
        raise RecipeError(f"{odd[0].tensor} is {odd[0].base_type}: a recipe starts from float weights")
    # measured KLD per unit of weight error, per kind and layer, for groups the run did not cover
    ratios: dict[str, list[tuple[int | None, float]]] = {}
    for m in measured.values():
        if m["weight_err"] > 0 and m["kld_mean"] > 0:
            ratios.setdefault(m["kind"], []).append((m["layer"], m["kld_mean"] / m["weight_err"]))
    if not ratios:
        raise RecipeError("the sensitivity run measured no group with a weight error")

    choices: list[Choice] = []
    in_groups = {g.tensor for g in groups}
    for k, g in enumerate(groups):
        if progress is not None:
            progress(k, len(groups), g.name)
        t = tensors[g.tensor]
        values = tensor_values(t).reshape(tuple(int(d) for d in reversed(t.shape)))
        imp = imatrix.get(g.tensor) if imatrix is not None else None
        m = measured.get(g.tensor)
        n_rows = g.n_params // g.n_per_row
        options = []
        for q in qtypes:
            if not can_hold(q, g.n_per_row):
                continue
            nbytes = row_size(q, g.n_per_row) * n_rows
            if m is not None and m["type"] == q.name:
                options.append(Option(q.name, nbytes, float(m["kld_mean"]), True))
                continue
            if q.name == g.base_type:
                err = 0.0
            else:
                err, _ = weight_error(values, round_trip(values, q, imp, threads or os.cpu_count() or 1), imp)
            if m is not None and m["weight_err"] > 0:
                kld = float(m["kld_mean"]) * err / float(m["weight_err"])
            else:
                kld = err * kld_per_error(ratios, g.kind, g.layer)
            options.append(Option(q.name, nbytes, kld, False))
        if not options:
            raise RecipeError(f"none of {', '.join(q.name for q in qtypes)} fits {g.tensor}'s rows of {g.n_per_row}")
        choices.append(Choice(g.name, g.tensor, g.kind, g.layer, g.n_params, options))
    if progress is not None:
        progress(len(groups), len(groups), "")
    fixed = sum(int(t.n_bytes) for t in reader.tensors if t.name not in in_groups)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    return fit(Recipe(choices, fixed, n_weights, target_bpw), target_bpw)


def fit(recipe: Recipe, target_bpw: float) -> Recipe:
    """A copy of ``recipe`` with its types chosen again for ``target_bpw`` (the predictions are reused)."""
    import copy

    out = copy.deepcopy(recipe)
    out.target_bpw = target_bpw
    choose(out.choices, int(np.floor(target_bpw * out.n_weights / 8.0)) - out.fixed_bytes)
    return out


def kld_per_error(ratios: dict[str, list[tuple[int | None, float]]], kind: str, layer: int | None) -> float:
    """KLD per unit of weight error for an unmeasured group: interpolated (in log) between the
    measured layers of its kind; the median of its kind, or of all groups, where that is not possible."""
    pts = ratios.get(kind, [])
    by_layer = sorted((lay, r) for lay, r in pts if lay is not None)
    if layer is not None and by_layer:
        xs = [float(lay) for lay, _ in by_layer]
        return float(np.exp(np.interp(float(layer), xs, [np.log(r) for _, r in by_layer])))
    vals = [r for _, r in pts] or [r for rs in ratios.values() for _, r in rs]
    return float(np.median(vals))


def write_recipe(base: str | os.PathLike, recipe: Recipe, dst: str | os.PathLike,
                 imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None) -> Path:
    from lcprobe.llama.quantizer import write_gguf

    return write_gguf(base, dst, recipe.types(), imatrix, threads)


def llama_quantize_command(recipe: Recipe, base: str | os.PathLike, dst: str | os.PathLike,
                           imatrix_path: str | os.PathLike | None = None) -> str:
    """The llama-quantize command line that writes the same types."""
    parts = ["llama-quantize"]
    if imatrix_path is not None:
        parts.append(f"--imatrix {imatrix_path}")
    parts.extend(recipe.tensor_type_args())
    parts.extend([str(base), str(dst), recipe.main_type()])
    return " \\\n  ".join(parts)


def evaluate_files(base: str | os.PathLike, files: Sequence[str | os.PathLike], text: str | Path | None = None,
                   n_ctx: int = 256, n_chunks: int | None = 4, skip_chunks: int = 0,
                   threads: int | None = None) -> dict[str, dict]:
    """Final KLD of each file against ``base`` on the same chunks (llama-perplexity's scoring).

    For a check on held-out text, ``skip_chunks`` moves past the chunks a
    sensitivity run used.
    """
    from lcprobe.studies.sensitivity import final_kld, kld_stats, make_reference, open_base, scoring_chunks
    from lcprobe.studies.sensitivity import _bos, text_tokens

    engine = open_base(Path(base), n_ctx, threads, use_mmap=True)
    try:
        tokens, _ = text_tokens(engine, text)
        chunks = scoring_chunks(tokens, n_ctx, n_chunks, _bos(engine), skip_chunks)
        ref = make_reference(engine, chunks)
    finally:
        engine.close()
    out: dict[str, dict] = {}
    for f in files:
        engine = open_base(Path(f), n_ctx, threads, use_mmap=True)
        try:
            out[str(f)] = {**kld_stats(final_kld(engine, ref)), "bits_per_weight": tensor_bits_per_weight(f),
                           "size_bytes": Path(f).stat().st_size}
        finally:
            engine.close()
    return out
