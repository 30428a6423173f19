"""``lcprobe merge``: the shards of a run, a suite, a comparison, a kld or a dump joined into what an
unsharded one writes.

A run directory is merged by :func:`lcprobe.results.merge.merge_run`; a suite
directory (suite.json) task by task, then suite.json and suite.csv rebuilt
from the merged summaries. A comparison (compare.json) likewise, its paired
task metrics recomputed from the merged items (exact). Its representation
measures (KL, cosine, rel_l2, top-1) are recomputed from each shard's float64
per-item sums (compare-sums.npz), added in the merged items.jsonl order, which
is the order the unsharded run added them in, and divided by
:meth:`lcprobe.studies.compare.RepStats.means` as the unsharded run does: when
the shards compared the same rows as the unsharded run, the sums, and so
compare.json, are the unsharded run's bit for bit. That holds when --max-rows
covers every row of every task (more precisely: when every shard compared
all its items and their rows add up to at most --max-rows). Otherwise the rows
differ: each shard compares the rows of its own first items up to --max-rows,
so the merge covers up to N x max_rows rows of other items than the
unsharded run's first ones (``rows_compared`` says how many); reproducing the
unsharded choice would need every earlier item's row count in each shard.
Shards written before compare-sums.npz existed (if any shard lacks it) merge
from compare.json's 6-significant-digit means weighted by their rows, so a
value can then differ from the unsharded one in its 6th significant digit.

A kld (kld.json with a ``shard`` record): every statistic recomputed from the
shards' per-token values (kld-values.npz) by the function the unsharded run
uses, so kld.json equals the unsharded run's bit for bit apart from the
``seconds`` (summed). A dump (index.json with a ``part`` record): by
:func:`lcprobe.results.dump.merge_dump`, byte-identical files.

Reads and writes files only; no model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from types import SimpleNamespace

import numpy as np

from lcprobe.results.compare import COMPARE_JSON, COMPARE_SUMS, read_compare, read_sums, sums_key, write_compare
from lcprobe.results.dump import INDEX as DUMP_INDEX
from lcprobe.results.dump import merge_dump
from lcprobe.results.kld import KLD_JSON, KLD_VALUES, read_kld, read_values, write_kld
from lcprobe.results.merge import MergeError, check_indices, merge_run, shard_range
from lcprobe.results.run import ITEMS, RUN, read_items
from lcprobe.results.suite import SUITE_JSON, read_suite, write_suite
from lcprobe.studies.suite import task_entry

if TYPE_CHECKING:
    from lcprobe.studies.compare import RepStats

# Options that may differ between the machines running the shards without changing a number.
_PER_MACHINE = ("shard", "rpc", "tensor_split", "n_threads", "n_gpu_layers", "memory_check")


def _same_options(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = (set(a) | set(b)) - set(_PER_MACHINE)
    return all(a.get(k) == b.get(k) for k in keys)


def merge_suite(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    suites = [read_suite(d) for d in dirs]
    first = suites[0]
    for d, s in zip(dirs[1:], suites[1:]):
        if s["tasks"] != first["tasks"] or [m["model"] for m in s["models"]] != [m["model"] for m in first["models"]]:
            raise MergeError(f"{d} and {dirs[0]} are not shards of one suite (other models or tasks)")
        if not _same_options(s["options"], first["options"]):
            raise MergeError(f"{d} and {dirs[0]} are not shards of one suite (other options)")
    if not first["options"].get("shard"):
        raise MergeError(f"{dirs[0]} is not a shard (run without --shard I/N)")
    merged: dict[str, Any] = {k: v for k, v in first.items() if k not in ("models", "complete", "seconds")}
    merged["options"] = dict(first["options"], shard=None)
    merged["models"] = []
    for record in first["models"]:
        rec = dict(record, tasks={}, errors={})
        for task in first["tasks"]:
            parts = [d / record["model"] / task for d in dirs]
            rec["tasks"][task] = task_entry(merge_run(parts, out / record["model"] / task))
        merged["models"].append(rec)
    merged["complete"] = all(e["complete"] for m in merged["models"] for e in m["tasks"].values())
    merged["seconds"] = round(sum(s.get("seconds", 0.0) for s in suites), 3)
    write_suite(out, merged)
    return merged


_REP = ("kl", "cosine", "rel_l2", "top1")


def merge_compare(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    from lcprobe.studies.compare import RepStats, model_task_entry, verdict

    parts = [read_compare(d) for d in dirs]
    first = parts[0]
    for d, c in zip(dirs[1:], parts[1:]):
        if ([m["path"] for m in c["models"]] != [m["path"] for m in first["models"]]
                or list(c["tasks"]) != list(first["tasks"]) or c["options"] != first["options"]):
            raise MergeError(f"{d} and {dirs[0]} are not shards of one comparison (other models, tasks or options)")
    for d, c in zip(dirs, parts):
        if not c.get("complete"):
            raise MergeError(f"{d / COMPARE_JSON} is incomplete; run that shard again")
    result: dict[str, Any] = {k: v for k, v in first.items() if k not in ("tasks", "timing", "complete")}
    result["complete"] = True
    result["tasks"] = {}
    models = {m["dir"]: m for m in first["models"]}
    # float64 per-item sums of every shard, or None when any shard predates compare-sums.npz
    loaded = [read_sums(d) for d in dirs]
    sums = None if any(x is None for x in loaded) else loaded
    for ti, (task, tr0) in enumerate(first["tasks"].items()):
        entries: list[dict[str, Any]] = []
        ref_info: tuple[Any, list[int], list[dict[str, Any]]] | None = None
        for k, e0 in enumerate(tr0["models"]):
            rec = models[Path(e0["dir"]).parent.name]
            run_dir = out / rec["dir"] / task
            merge_run([d / rec["dir"] / task for d in dirs], run_dir)
            records = read_items(run_dir / ITEMS)
            layers = [r["layer"] for r in e0["layers"]]
            shard_entries = [c["tasks"][task]["models"][k] for c in parts]
            rep = RepStats(len(layers))
            if k > 0 and sums is not None:
                _add_item_sums(rep, sums, sums_key(ti, k), shard_entries, records, dirs, task)
            else:
                # the reference compares with itself (constants), and old shards have no sums
                rep.n_rows = sum(e["rows_compared"] for e in shard_entries)
                for e in shard_entries:
                    for name in _REP:
                        vals = [r[name] for r in e["layers"]]
                        if e["rows_compared"] and None not in vals:
                            getattr(rep, name)[:] += np.asarray(vals, float) * e["rows_compared"]
            rep.seconds = sum(e["seconds_representation"] for e in shard_entries)
            cm = SimpleNamespace(path=rec["path"], quant=rec["quant"], label=rec["label"],
                                 representation=rec["representation"], info=SimpleNamespace(n_layer=rec["n_layer"]),
                                 mix=SimpleNamespace(bits_per_weight=rec["bits_per_weight"]))
            if ref_info is None:
                ref_info = (cm, layers, records)
            ref_cm, ref_layers, ref_records = ref_info
            entry = model_task_entry(cm, ref_cm, SimpleNamespace(metric=tr0["metric"]), run_dir, layers, records,
                                     ref_layers, ref_records, rep, is_reference=k == 0)
            if k > 0:
                entry["verdict"] = verdict(entry, entries[0], first["options"]["kl_threshold"])
            entries.append(entry)
        result["tasks"][task] = dict(tr0, models=entries, n_items=len(ref_info[2]) if ref_info else None,
                                     rows_compared=sum(c["tasks"][task]["rows_compared"] for c in parts),
                                     items_with_rows=sum(c["tasks"][task]["items_with_rows"] for c in parts))
    timing: dict[str, float] = {}
    for c in parts:
        for k, v in c.get("timing", {}).items():
            timing[k] = round(timing.get(k, 0.0) + v, 3)
    result["timing"] = timing
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_SUMS).unlink(missing_ok=True)  # an unsharded comparison's directory has none
    write_compare(out, result)
    return result


def _add_item_sums(rep: RepStats, sums: Sequence[dict[str, np.ndarray]], prefix: str,
                   shard_entries: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                   dirs: Sequence[Path], task: str) -> None:
    """Add the shards' per-item sums to ``rep`` in the merged items.jsonl order: the order in which
    the unsharded run added them, so that the float64 sums come out bit for bit the same."""
    from lcprobe.studies.compare import REP_MEASURES

    by_id: dict[str, tuple[int, np.ndarray]] = {}
    for d, z, e in zip(dirs, sums, shard_entries):
        try:
            ids, rows, vals = z[prefix + ".ids"], z[prefix + ".rows"], z[prefix + ".sums"]
        except KeyError:
            if e["rows_compared"]:
                raise MergeError(f"{d / COMPARE_SUMS} lacks {prefix} ({task}); run that shard again") from None
            continue  # this shard compared no rows of the task (e.g. its first item exceeded --max-rows)
        if int(rows.sum()) != e["rows_compared"] or vals.shape != (len(ids), len(REP_MEASURES), len(rep.kl)):
            raise MergeError(f"{d / COMPARE_SUMS} does not match its {COMPARE_JSON} ({task}); run that shard again")
        for item_id, n, v in zip(ids.tolist(), rows.tolist(), vals):
            by_id[item_id] = (n, v)
    for rec in records:
        hit = by_id.pop(rec["id"], None)
        if hit is not None:
            rep.add_sums(dict(zip(REP_MEASURES, hit[1])), hit[0])
    if by_id:
        raise MergeError(f"{COMPARE_SUMS} of the shards holds items of {task} that the merged run lacks "
                         f"(e.g. {next(iter(by_id))})")


def merge_kld(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    from lcprobe.studies.kld import model_stats, shard_identity

    parts = []
    for d in dirs:
        r = read_kld(d)
        sh = r.get("shard")
        if not isinstance(sh, dict):
            raise MergeError(f"{d} is not a shard (kld run without --shard I/N)")
        if not sh.get("complete") or len(r["models"]) != sh.get("n_models"):
            raise MergeError(f"shard {sh.get('index')}/{sh.get('count')} in {d} is incomplete; run it again")
        parts.append((d, r))
    parts.sort(key=lambda p: p[1]["shard"]["index"])
    d0, first = parts[0]
    ident0 = shard_identity(first)
    for d, r in parts[1:]:
        ident = shard_identity(r)
        diff = [k for k in ident0 if ident.get(k) != ident0[k]]
        if diff:
            raise MergeError(f"{d} and {d0} are not shards of one kld run: different {', '.join(diff)}")
    check_indices([(d, int(r["shard"]["index"]), int(r["shard"]["count"])) for d, r in parts])
    n_chunk = int(first["shard"]["n_chunk"])
    for d, r in parts:
        sh = r["shard"]
        want = list(shard_range(n_chunk, int(sh["index"]), int(sh["count"])))
        if sh["chunks"] != want:
            raise MergeError(f"{d} holds chunks {sh['chunks'][0]}..{sh['chunks'][1] - 1}, shard "
                             f"{sh['index']}/{sh['count']} of {n_chunk} chunks is {want[0]}..{want[1] - 1}")
    values = [read_values(d) for d, _ in parts]
    merged: dict[str, Any] = {k: v for k, v in first.items() if k != "shard"}
    merged["base"] = dict(first["base"], seconds=round(sum(r["base"]["seconds"] for _, r in parts), 2))
    merged["text"] = dict(first["text"], chunks=n_chunk,
                          tokens_scored=sum(r["text"]["tokens_scored"] for _, r in parts))
    merged["lens"] = dict(first["lens"], tokens_per_layer=sum(r["lens"]["tokens_per_layer"] for _, r in parts))
    merged["models"] = []
    for k, m in enumerate(first["models"]):
        prefix = f"m{k}."
        names = sorted({name[len(prefix):] for v in values for name in v if name.startswith(prefix)})
        try:
            vals = {name: np.concatenate([v[prefix + name] for v in values]) for name in names}
        except KeyError as exc:
            raise MergeError(f"a shard's kld-values.npz lacks {exc.args[0]}; run that shard again") from None
        n = len(vals.get("kld", ()))
        if n != merged["text"]["tokens_scored"]:
            raise MergeError(f"the shards' kld-values.npz hold {n} tokens of {m['path']}, their kld.json "
                             f"{merged['text']['tokens_scored']}; run the shards again")
        final, rows = model_stats(vals, [row["layer"] for row in m["layers"]])
        seconds = round(sum(r["models"][k]["seconds"] for _, r in parts), 2)
        merged["models"].append(dict(m, final=final, layers=rows, seconds=seconds))
    out.mkdir(parents=True, exist_ok=True)
    (out / KLD_VALUES).unlink(missing_ok=True)  # an unsharded run's directory has none
    write_kld(out, merged)
    return merged


def merge_dirs(dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """Merge shard directories (all runs, suites, comparisons, klds or dumps) into ``out_dir``: (kind,
    its summary)."""
    paths = [Path(d) for d in dirs]
    out = Path(out_dir)
    if len(paths) < 1:
        raise MergeError("give the shard directories to merge")
    for p in paths:
        if not p.is_dir():
            raise MergeError(f"{p} is not a directory")
        if p.resolve() == out.resolve():
            raise MergeError(f"-o {out} is one of the shards; write the merge elsewhere")
    def kind(p: Path) -> str | None:
        for name, marker in (("suite", SUITE_JSON), ("compare", COMPARE_JSON), ("run", RUN), ("kld", KLD_JSON),
                             ("dump", DUMP_INDEX)):
            if (p / marker).exists():
                return name
        return None

    kinds = {kind(p) for p in paths}
    if None in kinds:
        bad = next(p for p in paths if kind(p) is None)
        raise MergeError(f"{bad} is not a run ({RUN}), suite ({SUITE_JSON}), comparison ({COMPARE_JSON}), "
                         f"kld ({KLD_JSON}) or dump ({DUMP_INDEX}) directory")
    if len(kinds) > 1:
        raise MergeError(f"cannot merge {' with '.join(sorted(kinds))} directories")
    if kinds == {"suite"}:
        return "suite", merge_suite(paths, out)
    if kinds == {"compare"}:
        return "compare", merge_compare(paths, out)
    if kinds == {"kld"}:
        return "kld", merge_kld(paths, out)
    if kinds == {"dump"}:
        return "dump", merge_dump(paths, out)
    return "run", merge_run(paths, out)


def describe(kind: str, result: dict[str, Any]) -> str:
    if kind == "kld":
        tx = result["text"]
        return (f"merged kld: {len(result['models'])} model(s) against {Path(result['base']['path']).name}, "
                f"{tx['chunks']} chunks, {tx['tokens_scored']} tokens scored")
    if kind == "dump":
        return (f"merged dump: {result['n_tokens']} tokens in {result['n_windows']} windows, "
                f"{len(result['shards'])} shard files")
    if kind == "compare":
        return f"merged comparison: {len(result['models'])} model(s) x {len(result['tasks'])} task(s)"
    if kind == "suite":
        n = sum(e["n_items"] for m in result["models"] for e in m["tasks"].values())
        return (f"merged suite: {len(result['models'])} model(s) x {len(result['tasks'])} task(s), {n} items")
    return (f"merged run: {result['n_items']} items of {result['task']}; best layer {result['best_layer']} "
            f"({result['metric']} {result['best_value']})")

