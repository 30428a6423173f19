"""From items to token tries and decode groups: each unique token decoded once.

An item's choices share its context; choices may share leading tokens too.
Each item becomes a trie of tokens (:class:`Unit`): one batch entry per trie
node, tagged with the sequence ids of every choice whose path passes through
it. The instruction and demonstrations common to all items (the task prefix)
are decoded once into sequence 0 and copied into each choice's sequence, so
they cost nothing per item.

Only nodes whose next token is scored are outputs, so llama.cpp keeps (and the
capture copies) exactly the rows the lens needs: the last context token and
every continuation token but the last, once per distinct trie node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from lcprobe.errors import PromptTooLongError
from lcprobe.tasks.task import Item


@dataclass(frozen=True)
class Request:
    """An item's context and choice continuations as token ids."""

    index: int
    item: Item
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    split_mismatches: int = 0  # choices whose joint tokenization did not extend the context's


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation (lm-eval's rule).

    "A: " + "46" and "A:" + " 46" then tokenize the same way, with the space
    belonging to the answer as BPE vocabularies expect.
    """
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def encode_item(index: int, item: Item, tokenize: Callable[[str, bool], list[int]]) -> Request:
    """Tokenize an item lm-eval's way: jointly, then split at the context's tokens."""
    conts: list[tuple[int, ...]] = []
    ctx_tokens: list[int] | None = None
    mismatches = 0
    for choice in item.choices:
        ctx, cont = split_context(item.context, choice)
        ctx_t = tokenize(ctx, True)
        if ctx_tokens is None:
            ctx_tokens = ctx_t
        whole = tokenize(ctx + cont, True)
        if whole[: len(ctx_t)] == ctx_t and len(whole) > len(ctx_t):
            conts.append(tuple(whole[len(ctx_t):]))
        else:
            # The tokenizer merged across the boundary: score the continuation
            # tokenized on its own, after the unchanged context.
            mismatches += 1
            conts.append(tuple(tokenize(cont, False)))
    if not ctx_tokens:
        raise PromptTooLongError(f"item {item.id}: the context tokenizes to nothing")
    return Request(index, item, tuple(ctx_tokens), tuple(conts), mismatches)


def common_prefix_length(requests: Sequence[Request]) -> int:
    """Tokens shared by every context, leaving each at least one token of its own."""
    if not requests:
        return 0
    first = requests[0].context
    n = min(len(r.context) for r in requests) - 1
    for r in requests[1:]:
        k = 0
        lim = min(n, len(r.context))
        while k < lim and r.context[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(n, 0)


@dataclass
class Unit:
    """One request (or a slice of its choices) as a trie of batch entries."""

    request: Request
    choices: tuple[int, ...]  # indices into request.item.choices
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)  # 0 = first token after the prefix
    members: list[list[int]] = field(default_factory=list)  # local choice slots per node
    out_nodes: list[int] = field(default_factory=list)  # nodes with outputs, ascending
    out_targets: list[list[int]] = field(default_factory=list)  # tokens scored from each
    choice_pairs: list[list[tuple[int, int]]] = field(default_factory=list)  # per choice: (out rank, target rank)

    @property
    def n_nodes(self) -> int:
        return len(self.tokens)


def build_unit(request: Request, choices: Sequence[int], prefix_len: int) -> Unit:
    unit = Unit(request, tuple(choices))
    ctx = request.context[prefix_len:]
    children: dict[tuple[int, int], int] = {}
    node_targets: dict[int, list[int]] = {}
    pair_of: list[list[tuple[int, int]]] = []
    for slot, c in enumerate(choices):
        path = list(ctx) + list(request.continuations[c])
        parent = -1
        nodes = []
        for d, tok in enumerate(path):
            key = (parent, tok)
            node = children.get(key)
            if node is None:
                node = len(unit.tokens)
                children[key] = node
                unit.tokens.append(tok)
                unit.depth.append(d)
                unit.members.append([])
            unit.members[node].append(slot)
            nodes.append(node)
            parent = node
        pairs = []
        for i in range(len(ctx) - 1, len(path) - 1):
            targets = node_targets.setdefault(nodes[i], [])
            nxt = path[i + 1]
            if nxt not in targets:
                targets.append(nxt)
            pairs.append((nodes[i], targets.index(nxt)))
        pair_of.append(pairs)
    unit.out_nodes = sorted(node_targets)
    rank = {node: k for k, node in enumerate(unit.out_nodes)}
    unit.out_targets = [node_targets[n] for n in unit.out_nodes]
    unit.choice_pairs = [[(rank[n], t) for n, t in pairs] for pairs in pair_of]
    return unit


def build_units(requests: Sequence[Request], prefix_len: int, max_choices: int,
                max_nodes: int | None = None) -> list[Unit]:
    """Tries for all requests.

    An item's choices are split over several units when they need more
    sequences than ``max_choices`` or more KV cells than ``max_nodes`` (the
    context left after the prefix); each unit re-decodes the item's context.
    """
    units = []
    for r in requests:
        current: list[int] = []
        built: Unit | None = None
        for c in range(len(r.continuations)):
            trial = build_unit(r, current + [c], prefix_len)
            too_big = max_nodes is not None and trial.n_nodes > max_nodes
            if current and (len(current) >= max_choices or too_big):
                units.append(built)
                current, trial = [c], build_unit(r, [c], prefix_len)
            else:
                current.append(c)
            built = trial
        if built is not None:
            units.append(built)
    return units


def pad_before(cell: int, align: int, prefix_len: int) -> int:
    """Pad tokens that move a unit from KV cell ``cell`` to the next cell congruent to ``prefix_len``.

    Congruent, not a multiple: the unit's context tokens and first choice then
    sit at cells congruent to their positions, as in a prompt decoded alone.
    """
    return (prefix_len - cell) % align if align > 1 else 0


def group_units(
    units: Sequence[Unit], prefix_len: int, n_ctx: int, n_batch: int, max_seqs: int, max_rows: int,
    align: int = 0,
) -> list[list[Unit]]:
    """Pack units into decode groups that fit the KV cache, the sequences and a row budget.

    Deterministic for the same units, which keeps results byte-identical when a
    run is resumed (the same groups are decoded in the same cache layout).
    With ``align`` each unit's first KV cell is padded to a multiple of it
    (:func:`layout_group`); the pad tokens count against the batch and cache.
    """
    groups: list[list[Unit]] = []
    cur: list[Unit] = []
    tokens = seqs = rows = 0
    room = min(n_batch, n_ctx - prefix_len)
    for u in units:
        if prefix_len + u.n_nodes > n_ctx:
            raise PromptTooLongError(
                f"item {u.request.item.id} needs {prefix_len + u.n_nodes} tokens of context, "
                f"more than -c/--ctx-size {n_ctx}"
            )
        k = len(u.choices)
        n_out = len(u.out_nodes)
        pad = pad_before(prefix_len + tokens, align, prefix_len)
        fits = (
            tokens + pad + u.n_nodes <= room
            and seqs + k <= max_seqs
            and rows + n_out <= max_rows
        )
        if cur and not fits:
            groups.append(cur)
            cur, tokens, seqs, rows = [], 0, 0, 0
            pad = pad_before(prefix_len, align, prefix_len)
        # A unit that fills the cache or the batch on its own keeps what padding fits.
        tokens += min(pad, max(0, room - tokens - u.n_nodes))
        cur.append(u)
        tokens += u.n_nodes
        seqs += k
        rows += n_out
    if cur:
        groups.append(cur)
    return groups


@dataclass
class GroupBatch:
    """A decode group as flat batch arrays (sequence 0 is the shared prefix)."""

    tokens: np.ndarray
    positions: np.ndarray
    seq_ids: list[list[int]]
    outputs: np.ndarray
    seqs: list[int]  # every choice sequence the group uses (copies of the prefix)
    row_targets: list[np.ndarray]  # per output row in batch order: token ids to score
    unit_rows: list[int]  # first output row of each unit
    pad_seq: int | None = None  # the sequence holding the alignment pads, removed with the group
    n_pad: int = 0


def layout_group(group: Sequence[Unit], prefix_len: int, align: int = 0, pad_seq: int | None = None,
                 room: int | None = None) -> GroupBatch:
    """The group's batch; with ``align`` and ``pad_seq`` each unit starts at a KV cell congruent
    to ``prefix_len`` modulo ``align``.

    llama.cpp gives a batch's tokens consecutive free cells from the first
    free one, which after the prefix and with every earlier group removed is
    cell ``prefix_len``. Pad tokens in a sequence of their own (attended by no
    one, not outputs) fill the gap before each unit, so a unit's cells sit at
    the same offsets modulo ``align`` whatever shares its batch, and its
    context's cells at their positions' offsets as in a prompt decoded alone (see
    lcprobe.llama.engine.KV_CELL_ALIGN). ``room`` caps batch + pads as
    :func:`group_units` did.
    """
    tokens, positions, seq_ids, outputs = [], [], [], []
    seqs: list[int] = []
    row_targets: list[np.ndarray] = []
    unit_rows: list[int] = []
    next_seq = 1
    n_pad = 0
    if pad_seq is None:
        align = 0
    for u in group:
        pad = pad_before(prefix_len + len(tokens), align, prefix_len)
        if room is not None:
            pad = min(pad, max(0, room - len(tokens) - u.n_nodes))
        for _ in range(pad):
            # any real token does; positions run 0.. within the pad sequence, as llama.cpp requires
            tokens.append(u.tokens[0])
            positions.append(n_pad)
            seq_ids.append([pad_seq])
            outputs.append(False)
            n_pad += 1
        base = next_seq
        next_seq += len(u.choices)
        seqs.extend(range(base, next_seq))
        out_set = {n: k for k, n in enumerate(u.out_nodes)}
        unit_rows.append(len(row_targets))
        for node in range(u.n_nodes):
            tokens.append(u.tokens[node])
            positions.append(prefix_len + u.depth[node])
            seq_ids.append([base + s for s in u.members[node]])
            is_out = node in out_set
            outputs.append(is_out)
            if is_out:
                row_targets.append(np.asarray(u.out_targets[out_set[node]], dtype=np.int64))
    return GroupBatch(
        np.asarray(tokens, np.int32), np.asarray(positions, np.int32), seq_ids,
        np.asarray(outputs, bool), seqs, row_targets, unit_rows,
        pad_seq=pad_seq if n_pad else None, n_pad=n_pad,
    )


def unit_scores(u: Unit, pair_logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Sum a unit's pair log-probs into ``(n_choices_in_unit, n_layers)``.

    ``pair_logprobs[k]`` is ``(n_layers, n_targets)`` for the unit's k-th output row.
    """
    n_layers = pair_logprobs[0].shape[0] if pair_logprobs else 0
    out = np.zeros((len(u.choices), n_layers), np.float64)
    for slot, pairs in enumerate(u.choice_pairs):
        for row, t in pairs:
            out[slot] += pair_logprobs[row][:, t]
    return out
