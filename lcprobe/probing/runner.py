"""The probe: task items -> token tries -> batched decode with capture -> lens -> scores.

:class:`Prober` is the library entry point; it prints nothing. Progress goes
to an optional callback, results come back as :class:`ItemResult` objects in
item order, one decode group at a time, so a caller can write them as they
finish and stop between groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from lcprobe.probing.batching import (
    GroupBatch,
    Request,
    Unit,
    build_units,
    common_prefix_length,
    encode_item,
    group_units,
    layout_group,
    unit_scores,
)
from lcprobe.llama.capture import Site
from lcprobe.llama.engine import Engine
from lcprobe.errors import LcprobeError, PromptTooLongError
from lcprobe.analysis.lens import Lens
from lcprobe.results.run import ItemResult
from lcprobe.tasks.task import Item

# Captured rows kept per group: bounds memory for wide, deep models.
ROW_BUDGET_BYTES = 256 << 20

SITES = ("resid_post", "resid_mid")


@dataclass
class ProbeStats:
    items_total: int = 0
    items_done: int = 0
    items_skipped: int = 0
    tokens_decoded: int = 0
    tokens_unique: int = 0
    tokens_padding: int = 0  # decoded only to align items' KV cells (batch-invariant scores)
    prefix_tokens: int = 0
    lens_rows: int = 0
    split_mismatches: int = 0
    seconds_decode: float = 0.0
    seconds_lens: float = 0.0
    seconds_total: float = 0.0
    ctx_needed: int = 0  # -c/--ctx-size that would fit every skipped item (0: none skipped)
    # With a shard: the item indices (into the task's item list) this shard
    # scores, and how many items of the whole task fit the context.
    shard_positions: list[int] | None = None
    items_fit_total: int = 0


def shard_groups(groups: Sequence[Sequence[Unit]], index: int, count: int) -> list[int]:
    """Indices of the decode groups shard ``index`` (1-based) of ``count`` decodes.

    Whole groups, so every batch is the one an unsharded run decodes and the
    numbers are bit-identical; groups sharing an item (its choices split over
    units) stay together. Depends only on the groups, not on threads or machines.
    """
    block, prev, picked = -1, None, []
    for g, group in enumerate(groups):
        if group[0].request.index != prev:
            block += 1
        prev = group[-1].request.index
        if block % count == index - 1:
            picked.append(g)
    return picked


class Prober:
    def __init__(self, engine: Engine, lens: Lens, layers: Sequence[int], site: str = "resid_post",
                 overlap: bool = False) -> None:
        if site not in SITES:
            raise LcprobeError(f"unknown site '{site}' (choose from {', '.join(SITES)})")
        self.engine = engine
        self.lens = lens
        self.layers = list(layers)
        self.site = site
        self.overlap = overlap
        info = engine.info
        self.sites = [Site(info.site_name(site, layer), info.n_embd) for layer in self.layers]
        row_bytes = 4 * info.n_embd * len(self.layers)
        self.max_rows = max(64, ROW_BUDGET_BYTES // row_bytes)
        # Sequence 0 holds the prefix; with an aligned layout the last sequence holds the pad
        # tokens (see layout_group). Below four sequences (-b 2 or 3) the pads would take half
        # the choices' sequences and decode each context twice as often: such batches stay unaligned.
        self.align = engine.cell_align if engine.n_seq_max >= 4 else 0
        self.pad_seq = engine.n_seq_max - 1 if self.align else None
        self.max_seqs = engine.n_seq_max - (2 if self.align else 1)

    def encode(self, items: Sequence[Item]) -> tuple[list[Request], list[Item]]:
        """Tokenize items; those that cannot fit the context are returned as skipped."""
        tokenize = lambda text, special: self.engine.tokenize(text, add_special=special)  # noqa: E731
        requests, skipped = [], []
        self.skipped_needs: list[int] = []  # context each skipped item needs: the -c that fits it
        for i, item in enumerate(items):
            r = encode_item(i, item, tokenize)
            need = len(r.context) + max((len(c) for c in r.continuations), default=0)
            if need > self.engine.n_ctx:
                skipped.append(item)
                self.skipped_needs.append(need)
            else:
                requests.append(r)
        return requests, skipped

    def run(
        self,
        items: Sequence[Item],
        done: set[str] | frozenset[str] = frozenset(),
        progress: Callable[[ProbeStats], None] | None = None,
        stats: ProbeStats | None = None,
        on_rows: Callable[[list[ItemResult], np.ndarray], None] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[list[ItemResult]]:
        """Yield results group by group, in item order; ``done`` ids are not recomputed.

        ``shard=(i, n)`` scores only the i-th of n parts (see :func:`shard_groups`).

        ``on_rows(results, rows)`` sees each finished item's captured hidden
        rows, ``(n_layers, n_scored_rows, n_embd)`` in its choices' scoring
        order (for representation comparisons between models).
        """
        t_start = time.perf_counter()
        stats = stats or ProbeStats()
        requests, skipped = self.encode(items)
        stats.items_total = len(requests)
        stats.items_skipped = len(skipped)
        if not requests:
            ctx = self.engine.n_ctx
            raise PromptTooLongError(
                f"no item fits the context of {ctx} tokens; the shortest needs {min(self.skipped_needs)}: "
                f"use -c/--ctx-size {min(self.skipped_needs)} or more ({max(self.skipped_needs)} fits every item)"
                if skipped else "the task has no items"
            )
        stats.ctx_needed = max(self.skipped_needs, default=0)
        stats.split_mismatches = sum(r.split_mismatches for r in requests)
        eng = self.engine
        prefix_len, units, groups = self.layout(requests)
        prefix = list(requests[0].context[:prefix_len])
        stats.items_fit_total = len(requests)
        if shard is not None:
            groups = [groups[g] for g in shard_groups(groups, *shard)]
            requests = list({u.request.index: u.request for g in groups for u in g}.values())
            units = [u for g in groups for u in g]
            stats.items_total = len(requests)
            stats.shard_positions = [r.index for r in requests]
        stats.prefix_tokens = prefix_len
        stats.tokens_unique = prefix_len + sum(u.n_nodes for u in units)
        stats.items_done = sum(1 for r in requests if r.item.id in done)
        todo = [g for g in groups if any(u.request.item.id not in done for u in g)]
        if progress:
            progress(stats)
        if not todo:
            return
        eng.set_sites([])
        eng.clear()
        if prefix:
            t0 = time.perf_counter()
            self._decode_prefix(prefix)
            stats.seconds_decode += time.perf_counter() - t0
            stats.tokens_decoded += prefix_len
        eng.set_sites(self.sites)
        partial: dict[int, np.ndarray] = {}

        def finish(group, batch, hs) -> list[ItemResult]:
            results = self._finish_group(group, batch, hs, stats, partial, on_rows)
            stats.seconds_total = time.perf_counter() - t_start
            stats.items_done += len(results)
            if progress:
                progress(stats)
            return results

        if not self.overlap:
            try:
                for group in todo:
                    batch, hs = self._decode_group(group, prefix_len, stats)
                    yield finish(group, batch, hs)
            finally:
                eng.clear()
            return
        # The lens of group k runs in a worker thread (numpy and the ggml head
        # release the GIL) while llama.cpp decodes group k+1.
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcprobe-lens")
        pending = None
        try:
            for group in todo:
                batch, hs = self._decode_group(group, prefix_len, stats)
                if pending is not None:
                    yield pending.result()
                pending = pool.submit(finish, group, batch, hs)
            if pending is not None:
                result, pending = pending.result(), None
                yield result
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)
            eng.clear()

    def layout(self, requests: Sequence[Request]) -> tuple[int, list[Unit], list[list[Unit]]]:
        """The shared prefix length, the tries and the decode groups :meth:`run` decodes for ``requests``."""
        eng = self.engine
        prefix_len = common_prefix_length(requests)
        units = build_units(requests, prefix_len, self.max_seqs, eng.n_ctx - prefix_len)
        groups = group_units(units, prefix_len, eng.n_ctx, eng.n_batch, self.max_seqs, self.max_rows,
                             align=self.align)
        return prefix_len, units, groups

    def batch(self, group: Sequence[Unit], prefix_len: int) -> GroupBatch:
        """A group's batch as :meth:`run` lays it out (alignment pads included)."""
        eng = self.engine
        return layout_group(group, prefix_len, self.align, self.pad_seq,
                            room=min(eng.n_batch, eng.n_ctx - prefix_len))

    def _decode_prefix(self, prefix: list[int]) -> None:
        eng = self.engine
        for start in range(0, len(prefix), eng.n_batch):
            chunk = prefix[start : start + eng.n_batch]
            outputs = np.zeros(len(chunk), bool)
            outputs[-1] = True  # llama.cpp wants at least one output per batch
            eng.decode(chunk, range(start, start + len(chunk)), [[0]] * len(chunk), outputs)

    def _decode_group(self, group, prefix_len: int, stats: ProbeStats) -> tuple[GroupBatch, np.ndarray]:
        """Decode one group on sequences branching from the prefix; return its rows."""
        eng = self.engine
        batch = self.batch(group, prefix_len)
        t0 = time.perf_counter()
        for s in batch.seqs:
            eng.seq_copy(0, s)
        rows = []
        try:
            n = len(batch.tokens)
            for a in range(0, n, eng.n_batch):
                b = min(n, a + eng.n_batch)
                r, _ = eng.decode(batch.tokens[a:b], batch.positions[a:b], batch.seq_ids[a:b], batch.outputs[a:b])
                rows.append(r)
        finally:
            # Freed cells are reused from the lowest index, so the next group
            # lands where it would in a run that started with it (resume).
            for s in batch.seqs:
                eng.seq_remove(s)
            if batch.pad_seq is not None:
                eng.seq_remove(batch.pad_seq)
        stats.tokens_decoded += len(batch.tokens)
        stats.tokens_padding += batch.n_pad
        stats.seconds_decode += time.perf_counter() - t0
        return batch, np.concatenate(rows, axis=1)

    def _finish_group(self, group, batch: GroupBatch, hs: np.ndarray, stats: ProbeStats,
                      partial: dict[int, np.ndarray],
                      on_rows: Callable[[list[ItemResult], np.ndarray], None] | None) -> list[ItemResult]:
        """Lens on a decoded group's rows, then per-choice sums."""
        t1 = time.perf_counter()
        flat = self.lens.token_log_probs(hs, self.layers, batch.row_targets)
        if not np.isfinite(flat).all():
            # corrupt weights surface here as NaN/inf; metrics would only fail later, with a traceback
            bad = [self.layers[i] for i in np.flatnonzero(~np.isfinite(flat).all(axis=1))]
            raise LcprobeError(f"the model produced NaN or infinite log-probabilities at layer(s) "
                               f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}: "
                               "corrupt weights, or a model llama.cpp cannot run in float32?")
        stats.lens_rows += hs.shape[1]
        stats.seconds_lens += time.perf_counter() - t1
        sizes = [len(t) for t in batch.row_targets]
        per_row = np.split(flat, np.cumsum(sizes)[:-1], axis=1) if sizes else []
        results = []
        for u, first in zip(group, batch.unit_rows):
            scores = unit_scores(u, per_row[first : first + len(u.out_nodes)])
            req = u.request
            acc = partial.setdefault(req.index, np.zeros((len(req.continuations), len(self.layers))))
            acc[list(u.choices)] = scores
            if u.choices[-1] == len(req.continuations) - 1:
                results.append(self._result(req, partial.pop(req.index)))
                if on_rows is not None:
                    on_rows([results[-1]], hs[:, first : first + len(u.out_nodes)])
        return results

    @staticmethod
    def _result(req: Request, scores: np.ndarray) -> ItemResult:
        item = req.item
        return ItemResult(
            id=item.id,
            choices=list(item.choices),
            correct=list(item.correct),
            scores=scores,
            n_tokens=[len(c) for c in req.continuations],
            n_bytes=[len(c.encode("utf-8")) for c in item.choices],
            meta=dict(item.meta),
        )
