"""``lcprobe check``: the last-layer lens against llama.cpp's own logits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lcprobe.cli.common import add_model_args, load_options, make_console


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", help="compare the last-layer lens with llama.cpp's own logits",
                       description="Decode a built-in text, apply the lens to the last layer and compare "
                                   "with llama.cpp's logits. Exit 1 if the argmax agrees on fewer than 99% of the "
                                   "positions that are not near-ties (top-2 margin under twice the mean |diff|).")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--text", default=None, help="a text file to decode instead of the built-in sample")


SAMPLE_TEXT = (
    "The history of mathematics spans thousands of years. Early civilizations used numbers to count "
    "livestock, measure fields and track the seasons. In Mesopotamia, scribes wrote on clay tablets "
    "in a base-sixty system, which is why an hour still has sixty minutes. Greek mathematicians such as "
    "Euclid organised geometry into axioms and proofs, and Archimedes estimated the value of pi. Later, "
    "scholars in India introduced the digit zero and the decimal place-value system, ideas that reached "
    "Europe through translations of Arabic texts. Question: What is 17 + 25? Answer: 42. The capital of "
    "France is Paris, and the largest planet in the solar system is Jupiter."
)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lcprobe.analysis.lens import Lens
    from lcprobe.llama.capture import Site
    from lcprobe.llama.loader import open_model

    text = Path(args.text).read_text(encoding="utf-8") if args.text else SAMPLE_TEXT
    with open_model(args.model, load_options(args, n_ctx=max(args.ctx_size, 512), n_seq_max=1, layers="-1")) as model:
        info, engine, unembed = model.info, model.engine, model.unembed
        lens = Lens(unembed, info.n_layer, "final-norm")
        tokens = engine.tokenize(text)[: engine.n_ctx]
        engine.set_sites([Site(info.site_name("resid_post", info.n_layer), info.n_embd)])
        rows, logits = engine.decode_sequence(tokens, want_logits=True)
        ours = np.concatenate([lens.unembed.logits(lens.transform(rows[0][i:i + 256], info.n_layer))
                               for i in range(0, len(tokens), 256)])
    diff = np.abs(ours - logits)
    top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(ours, logits)])
    result = {
        "model": str(info.path), "architecture": info.arch, "quantization": info.file_type,
        "head_type": info.head_type, "lens_backend": unembed.backend, "n_tokens": len(tokens),
        "max_abs_diff": round(float(diff.max()), 6), "mean_abs_diff": round(float(diff.mean()), 6),
        "logit_scale": round(float(np.abs(logits).max()), 3),
        "argmax_agreement": round(float((ours.argmax(-1) == logits.argmax(-1)).mean()), 6),
        "top5_overlap": round(float(top5), 6),
    }
    # A position whose top two llama.cpp logits are closer than the typical
    # lens/llama.cpp difference is a near-tie either side may break: llama.cpp
    # quantizes activations for a quantized head, the float32 lens does not.
    # Agreement on the other, decisive positions is what says the lens is right.
    top2 = np.sort(np.partition(logits, -2, axis=-1)[:, -2:], axis=-1)
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * diff.mean()
    agree = ours.argmax(-1) == logits.argmax(-1)
    result["near_ties"] = int((~decisive).sum())
    result["decisive_argmax_agreement"] = round(float(agree[decisive].mean()) if decisive.any() else 1.0, 6)
    result["ok"] = result["decisive_argmax_agreement"] >= 0.99
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        c = make_console()
        verdict = "[green]OK[/]" if result["ok"] else "[red]MISMATCH[/]"
        c.print(f"{verdict} lens vs llama.cpp logits on {info.name} ({info.arch}, {info.file_type}, head {info.head_type}), "
                f"{len(tokens)} tokens")
        c.print(f"  argmax agreement {result['argmax_agreement']:.4f} ({result['decisive_argmax_agreement']:.4f} "
                f"without {result['near_ties']} near-ties), top-5 overlap {result['top5_overlap']:.4f}")
        c.print(f"  max |diff| {result['max_abs_diff']:.4f} (logits up to {result['logit_scale']}), mean |diff| {result['mean_abs_diff']:.4f}")
    return 0 if result["ok"] else 1


