"""``lcprobe merge``: join the directories of ``--shard I/N`` runs, suites, comparisons, klds or dumps."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  lcprobe run -m smollm2-135m -T calc --shard 1/2 -o results/part1     # on one machine
  lcprobe run -m smollm2-135m -T calc --shard 2/2 -o results/part2     # on another
  lcprobe merge results/part1 results/part2 -o results/calc

Checks that the directories are every part of one run (same model sha256, task
hash and options, each part once, complete, items disjoint and covering the task)
and writes what the unsharded run would have written: items.jsonl byte-identical,
summary.json equal apart from timing (summed over the shards). Suite directories
are merged task by task, with suite.json and suite.csv rebuilt. kld directories:
kld.json recomputed from the shards' per-token values (kld-values.npz), equal
to the unsharded run's apart from seconds. Dump directories: the parts' shard
files hard-linked (or copied) into -o, index.json as the unsharded dump's;
read_dump gives the unsharded dump's arrays.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="join the output directories of --shard runs, suites, compare, kld or dump",
                       description="Merge shard directories into the directory an unsharded run writes.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="the shards' output directories (any order)")
    p.add_argument("-o", "--output", required=True, help="directory to write the merged run or suite into")


def run(args: argparse.Namespace) -> int:
    from lcprobe.studies.merge import describe, merge_dirs

    kind, result = merge_dirs(args.dirs, args.output)
    print(f"{describe(kind, result)} -> {args.output}")
    return 0
