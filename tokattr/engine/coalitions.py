"""Coalitions sharing prefixes: the target on many perturbations of a row, each re-run only
from the first column where it differs from a coalition already computed (its *parent*), over
that coalition's key/value states.

A causal model's column ``j`` depends on columns ``0 .. j`` only, so two coalitions that agree
up to column ``c`` have the same keys and values there. Every coalition may take as parent
one of its row's two *trunks* (the row itself, every feature kept; and the row with every
feature removed) or a coalition the method names (``parents``): Shapley value sampling names
the previous coalition of the same permutation (one feature apart), exact Shapley values the
coalition without its last kept feature. Each coalition takes whichever of these agrees with
it longest.

The coalitions run in *waves*: trunks first, then each coalition one wave after its parent,
so a wave needs only the states of the wave before it (and the trunks'). Within a wave they go
in passes of like start columns, split where a new pass costs less than the columns
re-run (:func:`group_passes`). The scores are those of full passes, to float rounding.

Where this saves less than :data:`MIN_SAVING` of the estimated cost (columns, plus a fixed cost
per pass: :func:`pass_overhead_tokens`), full passes run instead; a coalition whose parent's
states would not fit the problem's states budget (:func:`tokattr.engine.memory.states_budget`)
takes a trunk as parent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from tokattr.engine import memory
from tokattr.engine.cache import Prefix, cache_states
from tokattr.methods.problem import AttributionProblem, chunked

MIN_SAVING = 0.15
"""Least share of the estimated cost of full passes (:func:`pass_overhead_tokens`) that prefix
sharing must save for it to run: it splits the coalitions into more, narrower passes."""


def _held_states(problem: AttributionProblem) -> int:
    """The problem's budget of held key/value states, in bytes
    (:func:`tokattr.engine.memory.states_budget`; :data:`~tokattr.engine.memory.STATES_BUDGET`
    where it sets none)."""
    return memory.STATES_BUDGET if problem.states_budget is None else problem.states_budget


def first_true(mask: Tensor) -> Tensor:
    """Each row's first column where ``mask`` holds, or its width where none does. ``[n]``"""
    width = mask.shape[1]
    cols = torch.arange(width, device=mask.device)
    return torch.where(mask, cols, width).min(-1).values


def sorted_neighbours(rows: Tensor) -> Tensor:
    """Parents for coalitions with none named, in lexicographic order (``rows`` ``[m]``
    sorted, each row's coalitions in lexicographic order of their keep flags, as
    :func:`torch.unique` leaves them): the coalition at position ``i`` of its row takes the one
    at ``i & (i - 1)`` (a Fenwick tree, Fenwick 1994), which shares every leading column that
    all the coalitions between them share; the first has none. So the coalitions run in about
    ``log2(m)`` waves, each sharing its leading columns with a close neighbour. ``[m]``"""
    m = len(rows)
    idx = torch.arange(m, device=rows.device)
    change = torch.ones(m, dtype=torch.bool, device=rows.device)
    change[1:] = rows[1:] != rows[:-1]
    first = torch.cummax(torch.where(change, idx, 0), 0).values
    pos = idx - first
    return torch.where(pos > 0, first + (pos & (pos - 1)), -1)


def chain_parents(n: int, block: int) -> Tensor:
    """Parents along a chain of ``n`` nested coalitions, each one feature more (or fewer) than
    the one before (the steps of a Shapley permutation, the points of an erasure curve): the
    parent step of each step ``1 .. n`` (0: the chain's start). Within blocks of ``block``
    steps, the step before (one feature apart, so it re-runs from that feature on, about
    half the columns); a block's first step takes the first step of block ``q & (q - 1)`` (a
    Fenwick tree over the blocks, Fenwick 1994), so the steps run in about
    ``block + log2(n / block)`` waves. ``[n]`` long"""
    k = torch.arange(1, n + 1)
    q = (k - 1) // block  # block of each step
    head = (q & (q - 1)) * block + 1  # the first step of its Fenwick parent block
    first = (k - 1) % block == 0
    return torch.where(first, torch.where(q > 0, head, 0), k - 1)


def chain_length(n: int, chains: int, batch_size: int) -> int:
    """How many consecutive steps of chains of ``n`` steps to chain one after another
    (:func:`chain_parents`) when ``chains`` of them run side by side: as many as keep each
    wave of passes about one pass (``batch_size`` sequences) full. At least 1."""
    waves = chains * n // max(1, batch_size)
    return max(1, min(n, waves - max(1, n.bit_length())))


def plan(
    problem: AttributionProblem, rows: Tensor, col_keep: Tensor, parents: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Parents, start columns and waves of the coalitions ``rows``/``col_keep`` (``[m]``,
    ``[m, seq]`` per-column keep flags, distinct) with the method's ``parents`` ``[m]`` (an
    index into them, or -1).

    The returned lists cover ``m + 2 u`` entries: the coalitions, then the full trunk and the
    empty trunk of each of the ``u`` rows (``rows`` of the entries ``[m + 2 u]``). For each
    entry: its parent entry (-1: none, computed from its first column), the column it is
    computed from, and its wave (-1: not computed: a coalition equal to a trunk, or a trunk
    nobody uses). And for each coalition the entry whose value it takes (itself, or the
    trunk it equals). ``(entry rows, parent, start, wave)``, ``[m + 2u]`` each, and
    ``source`` ``[m]``."""
    device = col_keep.device
    m, seq = col_keep.shape
    feat = problem.feature_mask[rows]  # [m, seq]
    off_full = first_true(feat & ~col_keep)  # first removed column
    off_none = first_true(feat & col_keep)  # first kept column
    urows, at = torch.unique(rows, return_inverse=True)  # [u], [m]
    u = len(urows)
    full_i, none_i = m + at, m + u + at  # the coalition's trunks, as entries
    # A coalition equal to a trunk is that trunk: its children take the trunk as parent.
    alias = torch.arange(m + 2 * u, device=device)
    is_full, is_none = off_full == seq, off_none == seq
    alias[:m] = torch.where(is_full, full_i, torch.where(is_none, none_i, alias[:m]))
    parent, start = _better_trunk(off_full, off_none, full_i, none_i)
    if not bool((parents >= 0).any()):
        parents = sorted_neighbours(rows)
    # The method's parent, where it agrees longer than the trunk.
    named = parents >= 0
    p = torch.where(named, parents, 0)
    if bool((named & (rows[p] != rows)).any()):
        raise ValueError("a coalition's parent must be a coalition of the same row")
    own = first_true(col_keep != col_keep[p])  # [m]
    better = named & (own > start) & (own < seq) & (alias[p] != torch.arange(m, device=device))
    parent = torch.where(better, alias[p], parent)
    start = torch.where(better, own, start)
    trunk = is_full | is_none
    parent = torch.where(trunk, -1, parent)
    start = torch.where(trunk, 0, start)
    entry_rows = torch.cat([rows, urows, urows])
    parent = torch.cat([parent, torch.full((2 * u,), -1, dtype=torch.long, device=device)])
    start = torch.cat([start, torch.zeros(2 * u, dtype=torch.long, device=device)])
    # Waves: a trunk in use 0, a coalition one after its parent.
    wave = torch.full((m + 2 * u,), -1, dtype=torch.long, device=device)
    used = torch.zeros(m + 2 * u, dtype=torch.bool, device=device)
    used[parent[parent >= 0]] = True
    used[alias[:m][trunk]] = True
    wave[m:] = torch.where(used[m:], 0, -1)
    todo = torch.cat([~trunk, torch.zeros(2 * u, dtype=torch.bool, device=device)])
    for _ in range(m + 1):
        ready = todo & (wave[parent.clamp(min=0)] >= 0)
        if not ready.any():
            break
        wave[ready] = wave[parent[ready]] + 1
        todo &= ~ready
    if todo.any():
        raise ValueError("the coalitions' parents form a cycle")
    return entry_rows, parent, start, wave, alias[:m]


@torch.inference_mode()
def evaluate_sharing_prefixes(
    problem: AttributionProblem, rows: Tensor, col_keep: Tensor, parents: Tensor
) -> Tensor | None:
    """The target on each coalition (``rows`` ``[m]``, ``col_keep`` ``[m, seq]`` per-column
    keep flags, distinct; ``parents`` ``[m]`` the method's parent of each, or -1), each
    re-run from its first column that differs from its parent; ``None`` where that would save
    less than :data:`MIN_SAVING` of the columns (the caller then runs full passes). ``[m]``"""
    device = col_keep.device
    m, seq = col_keep.shape
    entry_rows, parent, start, wave, source = plan(problem, rows, col_keep, parents)
    u = (len(entry_rows) - m) // 2
    overhead = pass_overhead_tokens(problem)
    shared_overhead = overhead + pass_overhead_tokens(problem, CACHE_PASS_S)
    max_rows = rows_per_cached_pass(problem, seq)
    left = problem.left_pad[entry_rows]
    end = problem.right_end[entry_rows]
    full_cost = float((end - left)[:m].sum()) + overhead * -(-m // problem.batch_size)
    cost = 0.0
    for w in range(int(wave.max()) + 1):
        mine = wave == w
        need = torch.sort(seq - start[mine], descending=True).values.tolist()
        cost += group_passes(need, problem.batch_size * seq, shared_overhead, max_rows)[1]
    if cost > (1 - MIN_SAVING) * full_cost:
        return None
    # The columns of each entry's states its children read: up to the latest child's start.
    need = torch.zeros_like(start)
    has_parent = parent >= 0
    need.scatter_reduce_(0, parent[has_parent], start[has_parent], "amax")
    values = torch.full((len(entry_rows),), float("nan"), device=device)
    x_keep = torch.cat([col_keep, torch.ones(u, seq, dtype=torch.bool, device=device)])
    x_keep = torch.cat([x_keep, ~problem.feature_mask[entry_rows[m + u :]]])
    per_token = _state_bytes_per_token(problem)
    # Trunks keep every column: a coalition whose parent's states were not kept falls back
    # to one.
    trunks = torch.arange(m, m + 2 * u, device=device)
    need[trunks] = torch.where(wave[trunks] == 0, seq, 0)
    trunk_store = _Store(need, trunks[wave[trunks] == 0], None)
    n_waves = int(wave.max()) + 1
    store_prev: _Store | None = None
    for w in range(n_waves):
        mine = (wave == w).nonzero().squeeze(-1)
        if w > 0 and store_prev is not None:
            # Parents whose states were not kept: their children take their best trunk.
            lost = ~store_prev.holds(parent[mine]) & ~trunk_store.holds(parent[mine])
            if lost.any():
                i = mine[lost]
                parent[i], start[i] = _trunk_parent(problem, entry_rows, x_keep, wave, i, m)
        # Keep the states this wave's children read, within the budget.
        if w == 0:
            store = trunk_store
        else:
            keepers = mine[need[mine] > 0]
            budget = _held_states(problem) // max(1, per_token)
            tokens = torch.cumsum(need[keepers], 0)
            store = _Store(need, keepers[tokens <= budget], trunk_store)
        _run_wave(
            problem, entry_rows, x_keep, parent, start, mine, values, store, store_prev,
            shared_overhead, max_rows,
        )  # fmt: skip
        store_prev = store
    return values[source]


def _trunk_parent(
    problem: AttributionProblem, entry_rows: Tensor, x_keep: Tensor, wave: Tensor, i: Tensor, m: int
) -> tuple[Tensor, Tensor]:
    """The better computed trunk of entries ``i`` as parent and their start columns from it
    (no computed trunk: no parent, start 0)."""
    u = (len(entry_rows) - m) // 2
    feat = problem.feature_mask[entry_rows[i]]
    off_full, off_none = first_true(feat & ~x_keep[i]), first_true(feat & x_keep[i])
    slot = torch.searchsorted(entry_rows[m : m + u], entry_rows[i])
    full_i, none_i = m + slot, m + u + slot
    off_full = torch.where(wave[full_i] == 0, off_full, -1)
    off_none = torch.where(wave[none_i] == 0, off_none, -1)
    parent, start = _better_trunk(off_full, off_none, full_i, none_i)
    return torch.where(start > 0, parent, -1), start.clamp(min=0)


def _better_trunk(
    off_full: Tensor, off_none: Tensor, full_i: Tensor, none_i: Tensor
) -> tuple[Tensor, Tensor]:
    """The trunk a coalition agrees with longer (ties: the row itself) and where it first
    differs from it, from the first columns where it differs from each."""
    use_none = off_none > off_full
    return torch.where(use_none, none_i, full_i), torch.where(use_none, off_none, off_full)


def rows_per_cached_pass(problem: AttributionProblem, seq: int) -> int:
    """The most sequences a pass from key/value states holds: each holds ``seq`` columns of
    states (its parent's, gathered, and its own), within the problem's states budget
    (:func:`_held_states`)."""
    return max(1, _held_states(problem) // max(1, seq * _state_bytes_per_token(problem)))


def _state_bytes_per_token(problem: AttributionProblem) -> int:
    """Key/value bytes of one token (every layer; the hidden width bounds the key/value width
    of grouped-query attention), from the model's shape where known."""
    size = problem.embeds.element_size()
    shape = problem.shape
    if shape is None:
        return 2 * 32 * problem.embeds.shape[-1] * size
    return 2 * shape.layers * shape.hidden * size


class _Store:
    """The key/value states of some entries, columns ``0 .. need - 1`` of each, per layer."""

    def __init__(self, need: Tensor, entries: Tensor, trunks: _Store | None) -> None:
        self.need = need
        self.entries = entries
        self.slot = torch.full_like(need, -1)
        self.slot[entries] = torch.arange(len(entries), device=need.device)
        self.width = int(need[entries].max()) if len(entries) else 0
        self.layers: list[tuple[Tensor, Tensor]] | None = None  # allocated on first put
        self.trunks = trunks

    def holds(self, entries: Tensor) -> Tensor:
        ok = entries >= 0
        return ok & (self.slot[entries.clamp(min=0)] >= 0)

    def put(self, entries: Tensor, states: list[tuple[Tensor, Tensor]], col0: int) -> None:
        """Store columns ``col0 ..`` of ``states`` (``[len(entries), heads, cols, dim]`` per
        layer) for those of ``entries`` this store keeps."""
        slot = self.slot[entries]
        mine = slot >= 0
        if not mine.any() or self.width == 0:
            return
        if self.layers is None:
            k0 = states[0][0]
            shape = (len(self.entries), k0.shape[1], self.width, k0.shape[3])
            self.layers = [(k.new_zeros(shape), v.new_zeros(shape)) for k, v in states]
        stop = min(self.width, col0 + states[0][0].shape[2])
        if stop <= col0:
            return
        for (sk, sv), (k, v) in zip(self.layers, states, strict=True):
            sk[slot[mine], :, col0:stop] = k[mine, :, : stop - col0]
            sv[slot[mine], :, col0:stop] = v[mine, :, : stop - col0]

    def gather(
        self, entries: Tensor, col0: int, col1: int, out: list[tuple[Tensor, Tensor]]
    ) -> None:
        """Write columns ``col0 .. col1 - 1`` of those of ``entries`` this store holds into
        ``out`` (``[len(entries), heads, col1 - col0, dim]`` per layer)."""
        slot = self.slot[entries.clamp(min=0)]
        mine = (entries >= 0) & (slot >= 0)
        if not mine.any():
            return
        assert self.layers is not None
        for (ok, ov), (sk, sv) in zip(out, self.layers, strict=True):
            ok[mine] = sk[slot[mine], :, col0:col1]
            ov[mine] = sv[slot[mine], :, col0:col1]


def _run_wave(
    problem: AttributionProblem,
    entry_rows: Tensor,
    x_keep: Tensor,
    parent: Tensor,
    start: Tensor,
    mine: Tensor,
    values: Tensor,
    store: _Store,
    prev: _Store | None,
    overhead: float,
    max_rows: int,
) -> None:
    """The target on entries ``mine``, each from its start column over its parent's states
    (in ``prev`` or the trunk store), in bands of like start columns; their states kept in
    ``store`` where it keeps them."""
    seq = x_keep.shape[1]
    order = mine[torch.argsort(start[mine], stable=True)]
    need = seq - start[order]
    sources = [s for s in (prev, prev.trunks if prev is not None else None) if s is not None]

    def run(i: int, j: int) -> None:
        e = order[i:j]
        r = entry_rows[e]
        cols = problem.trim(r)
        offset = int(start[e].min())
        keep = x_keep[e][:, cols, None]
        x = torch.where(keep, problem.embeds[r, cols], problem.baselines[r, cols])
        inputs = problem.inputs.select(r, cols)
        if offset <= cols.start or not sources:  # from the first column
            cache, offset = DynamicCache(), cols.start
        else:
            layers = _empty_layers(sources, len(e), offset - cols.start)
            for s in sources:
                s.gather(parent[e], cols.start, offset, layers)
            cache = DynamicCache(ddp_cache_data=layers)
        f = problem.forward(x, inputs, past=Prefix(cache, offset - cols.start))
        values[e] = f.to(values.dtype)
        store.put(e, cache_states(cache), cols.start)

    groups, _ = group_passes(need.tolist(), problem.batch_size * seq, overhead, max_rows)
    for g0, g1 in groups:
        chunked(g1 - g0, g1 - g0, lambda i, j, s=g0: run(s + i, s + j))


CACHE_PASS_S = 3e-3
"""Seconds a pass from key/value states adds to a plain one: gathering its parents' states
layer by layer, building the cache, keeping the new states."""


def pass_overhead_tokens(problem: AttributionProblem, seconds: float | None = None) -> float:
    """The fixed cost of one forward pass, in tokens' worth of compute: reading every weight
    once and launching every layer's operations, whatever the pass's size, against two
    floating-point operations per weight per token (``seconds``: the same for that many
    seconds instead). On 2 CPU cores this is about 48 tokens for the 100M-parameter benchmark
    Llama (48 ms a pass, 1 ms a token) and about 250 for the bundled 1.8M-parameter model
    (5 ms, 25 us); on a GPU, thousands."""
    shape = problem.shape
    if shape is None:
        return 64.0
    weights = shape.layers * (4 * shape.hidden**2 + 3 * shape.hidden * shape.intermediate)
    weights += shape.vocab * shape.hidden
    gpu = problem.embeds.device.type == "cuda"
    fixed_s, bandwidth, flops = (2e-3, 2e12, 2e14) if gpu else (4e-3, 9e9, 2e11)
    if seconds is None:
        seconds = fixed_s + weights * shape.bytes_per_value / bandwidth
    return seconds / (2 * weights / flops)


def group_passes(
    need: list[int], max_tokens: int, overhead: float, max_rows: int | None = None
) -> tuple[list[tuple[int, int]], float]:
    """Split sequences sorted by the columns they re-run (``need``, non-increasing) into
    passes ``[start, stop)``: a pass re-runs all its sequences from the first one's start, so
    it costs ``overhead`` plus its size times ``need[start]`` tokens, and holds at most
    ``max_tokens`` re-run tokens and ``max_rows`` sequences (at least one). The split of
    least total cost, and that cost (dynamic programming over the sorted order, as in optimal
    1-D segmentation: Bellman, "On the approximation of curves by line segments using dynamic
    programming", CACM 1961)."""
    n = len(need)
    if n == 0:
        return [], 0.0
    best = np.zeros(n + 1)
    cut = np.full(n + 1, n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        width = max(1, need[i])
        most = max(1, min(n - i, max_tokens // width, max_rows or n))
        cost = overhead + np.arange(1, most + 1) * width + best[i + 1 : i + most + 1]
        k = int(np.argmin(cost))
        best[i], cut[i] = cost[k], i + 1 + k
    out, i = [], 0
    while i < n:
        out.append((i, int(cut[i])))
        i = int(cut[i])
    return out, float(best[0])


def _empty_layers(sources: list[_Store], n: int, cols: int) -> list[tuple[Tensor, Tensor]]:
    """Zeroed key/value tensors for ``n`` sequences of ``cols`` columns, per layer, shaped
    and typed as the stores' states."""
    like = next(s.layers for s in sources if s.layers is not None)
    return [
        (k.new_zeros(n, k.shape[1], cols, k.shape[3]), v.new_zeros(n, v.shape[1], cols, v.shape[3]))
        for k, v in like
    ]
