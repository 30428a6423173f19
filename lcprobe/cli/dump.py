"""``lcprobe dump``: stream a text's residual-stream activations to safetensors shards."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lcprobe.cli.common import add_model_args, add_shard_arg, load_options, parse_shard, resume_hint

if TYPE_CHECKING:
    from lcprobe.studies.dump import DumpOptions

EPILOG = """\
examples:
  lcprobe dump -m smollm2-135m --text corpus.txt -o dumps/smol
  lcprobe dump -m smollm2-135m --text corpus.txt --sites resid_post,resid_mid --layers 10:20 \\
               --max-tokens 1000000 --shard-tokens 8192 --dtype float32 -o dumps/smol-mid
  lcprobe dump ... --resume                         # continue an interrupted dump in the same -o
  lcprobe dump ... --shard 2/4 -o dumps/part2       # a quarter of the shard files, on one machine
  lcprobe merge dumps/part1 dumps/part2 dumps/part3 dumps/part4 -o dumps/smol

Windows: the text is cut into windows of -c tokens and every window is decoded
from an empty KV cache, with the model's BOS token first when the model adds
one (it counts towards the window and is dumped, at position 0). Paragraphs
(blank-line separated) are tokenized one by one, each followed by a blank line.

Output: DIR/shard-00000.safetensors, ... with tensors "<site>.<layer>"
(n_tokens, n_embd; layers 1-based), "tokens" and "positions" (int32, the
position in the window), --shard-tokens rows each (the last one fewer), and
DIR/index.json (model and its sha256, text sha256, sites, layers, dtype,
window, tokens per shard). Read it back in Python:

  dump = lcprobe.read_dump("dumps/smol"); dump["resid_post", 5]; dump.tokens

--shard I/N splits the shard files the whole dump would write into N
contiguous ranges (a tokenization pass over the text counts them) and writes
range I, byte for byte the whole dump's files under the same names; 'lcprobe
merge' links the N directories' files into one and writes the whole dump's
index.json. --resume continues a part like any dump.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.results.dump import DEFAULT_SHARD_TOKENS

    p = sub.add_parser(
        "dump", help="stream activations of a text to safetensors shards (for SAE or probe training)",
        description="Decode a text in windows and write the residual stream at the chosen sites and layers "
                    "to safetensors shards, one shard in memory at a time; resumable.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
    )
    add_model_args(p)
    # Overrides of the shared model options: -c is the window here, and a dump loads no lens head.
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="window length in tokens: each window is decoded from an empty KV cache, BOS first "
                        "when the model adds one (default 2048)")
    p.add_argument("--lens-backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--text", required=True, help="UTF-8 text file to decode")
    p.add_argument("--sites", default="resid_post",
                   help="comma-separated sites: resid_pre, resid_mid, resid_post (default resid_post)")
    p.add_argument("--layers", default=None, help="layers, 1-based: e.g. 1:10,20,-1 (default: all)")
    p.add_argument("--dtype", default="float16", help="float16 (default) or float32")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many tokens, BOS tokens included (default: the whole text)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard; one shard is held in memory (default {DEFAULT_SHARD_TOKENS})")
    add_shard_arg(p, "dump's safetensors files, a contiguous range each")
    p.add_argument("-o", "--output", default=None, help="output directory (default: results/<model>/dump)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted dump in -o (same model, text and options)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def dump_options(args: argparse.Namespace) -> "DumpOptions":
    from lcprobe.studies.dump import DumpOptions

    sites = tuple(s.strip() for s in str(args.sites).split(",") if s.strip())
    return DumpOptions(sites=sites, layers=args.layers, dtype=args.dtype, window=args.ctx_size,
                       shard_tokens=args.shard_tokens, max_tokens=args.max_tokens, part=parse_shard(args.shard))


def _progress(console: Any, enabled: bool, by_tokens: bool):
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    amount = MofNCompleteColumn() if by_tokens else DownloadColumn()
    return Progress(TextColumn("[bold]dump"), BarColumn(), amount, TextColumn("tokens" if by_tokens else "of text"),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=not enabled)


@contextlib.contextmanager
def _checked(out_dir: Path, info: Any, options: Any, text: Any, resume: bool) -> Iterator[None]:
    """The existing-dump check, inside the lock and before the model loads."""
    from lcprobe.studies.dump import check_existing

    check_existing(out_dir, info, options, text, resume)
    yield


def run(args: argparse.Namespace) -> int:
    from lcprobe.cli.common import Interrupt, make_console
    from lcprobe.files.catalog import resolve_model
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.llama.loader import open_model
    from lcprobe.results.lock import lock_dir
    from lcprobe.sites import parse_layers
    from lcprobe.studies.dump import check_dump_memory, check_text, run_dump

    console = make_console(args.quiet)
    options = dump_options(args)
    # Everything checkable without the weights is checked before loading them.
    options.validate()
    text = check_text(args.text)
    info = read_model_info(resolve_model(args.model))
    parse_layers(options.layers, info.n_layer)
    for s in options.sites:
        info.site_name(s, 1)  # an architecture without a named resid_mid refuses here
    n_batch = max(1, min(args.batch_size, options.window))
    check_dump_memory(info, options, n_batch)
    out_dir = Path(args.output or Path("results") / info.stem / "dump")
    lo = load_options(args, n_ctx=options.window, n_batch=n_batch, n_seq_max=1, lens_backend=None,
                      layers=options.layers)
    # the lock first: a second writer is refused before the index is read or the model loaded
    with lock_dir(out_dir, "lcprobe dump"), _checked(out_dir, info, options, text, args.resume), \
            open_model(info.path, lo, log_path=out_dir / "llama.log") as lm:
        console.print(f"[bold]lcprobe dump[/] {info.name} [dim]({info.arch}, {info.n_layer} layers, "
                      f"{info.file_type})[/]: {text.path.name} -> {out_dir}")
        by_tokens = options.max_tokens is not None
        with Interrupt() as stop, _progress(console, not args.quiet, by_tokens) as prog:
            task = prog.add_task("dump", total=options.max_tokens if by_tokens else text.n_bytes, detail="")

            def progress(p) -> None:
                rate = p.tokens_decoded / p.seconds if p.seconds > 0 else 0.0
                prog.update(task, completed=p.tokens if by_tokens else p.text_bytes,
                            detail=f"{p.tokens} tokens, {p.shards} shards, {rate:.0f} tok/s")

            outcome = run_dump(lm, text, out_dir, options, resume=args.resume, progress=progress,
                               should_stop=lambda: stop.requested)
    index = outcome.index
    shards = len(index["shards"])
    if outcome.already_complete:
        print(f"{out_dir} already holds the complete dump: {index['n_tokens']} tokens in {shards} shards")
        return 0
    if outcome.interrupted:
        console.print(f"[yellow]interrupted[/]: {index['n_tokens']} tokens in {shards} shards kept in {out_dir}"
                      + (f"; the unfinished shard's {outcome.tokens_dropped} tokens are decoded again on resume"
                         if outcome.tokens_dropped else ""))
        print(f"resume with: {resume_hint(args)}", file=sys.stderr)
        return 130
    nonfinite = sum(s["n_nonfinite"] for s in index["shards"])
    if nonfinite:
        print(f"lcprobe: warning: {nonfinite} dumped values are inf or NaN"
              + (" (beyond float16's range: use --dtype float32)" if index["dtype"] == "float16" else ""),
              file=sys.stderr)
    size = sum(s["bytes"] for s in index["shards"])
    kept = f" ({outcome.tokens_kept} kept from the interrupted run)" if outcome.tokens_kept else ""
    part = index.get("part")
    if part:
        kept += (f" (shard {part['index']}/{part['count']}: tokens {part['tokens'][0]}..{part['tokens'][1]} "
                 f"of {part['total_tokens']})")
    print(f"dump of {info.name}: {index['n_tokens']} tokens{kept} in {index['n_windows']} windows, "
          f"{len(index['tensors'])} tensors x {info.n_embd} {index['dtype']}, {shards} shards, "
          f"{size / 1e6:.1f} MB, {outcome.tokens_per_second:.0f} tokens/s -> {out_dir / 'index.json'}")
    return 0
