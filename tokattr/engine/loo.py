"""Leave-one-out: ``f(x) - f(x without feature j)`` for every feature of every row, the
engine primitive behind occlusion (Zeiler & Fergus, ECCV 2014) and the ``loo_kendall_tau``
metric.

Each perturbation differs from its row only from its removed token on, so the columns before
it need not be recomputed: with a target that takes key/value prefixes (``prefix_ok``), rows
whose tree (the row plus each perturbation from its removed token on) is short go packed into
one sequence with tree attention (:class:`~tokattr.engine.packing.Branches`, where
``branches_ok``), longer rows re-run each perturbation from the removed token on over the
unperturbed pass's key/value states. Otherwise one batched pass over every perturbation.
The scores are the same either way, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokattr.engine.cache import Prefix, prefix_cache
from tokattr.engine.coalitions import (
    CACHE_PASS_S,
    group_passes,
    pass_overhead_tokens,
    rows_per_cached_pass,
)
from tokattr.engine.memory import packed_rows_per_pass
from tokattr.engine.packing import Branches, first_fit_trees, tree_sizes
from tokattr.methods.problem import AttributionProblem, chunked


@torch.no_grad()
def leave_one_out(
    problem: AttributionProblem, share_prefixes: bool = True
) -> tuple[Tensor, Tensor]:
    """``f(x)`` per row and the drop ``f(x) - f(x without feature j)`` for every feature slot
    ``j`` (0 past a row's features). ``share_prefixes``: compute each row's columns before a
    removed token once (where the problem's target allows it); ``False``: ``n + 1`` full
    sequences per row. ``[batch]`` (the target's dtype), ``[batch, n_max]`` float64."""
    device = problem.embeds.device
    n_max = int(problem.n_features.max())
    slots = torch.arange(n_max, device=device)[None]  # [1, n_max]
    rows, slot = (slots < problem.n_features[:, None]).nonzero(as_tuple=True)  # [P] each
    if share_prefixes and problem.prefix_ok:
        fx, removed = _sharing_prefixes(problem, rows, problem.feature_columns()[rows, slot], slot)
    else:
        # One pass over every perturbation of every row, plus each row unperturbed.
        keep = torch.ones(len(rows) + problem.n_rows, n_max, dtype=torch.bool, device=device)
        keep[torch.arange(len(rows), device=device), slot] = False
        every = torch.arange(problem.n_rows, device=device)
        f = problem.evaluate(torch.cat([rows, every]), keep)
        removed, fx = f[: len(rows)], f[len(rows) :]
    drops = torch.zeros(problem.n_rows, n_max, dtype=torch.float64, device=device)
    drops[rows, slot] = fx[rows].double() - removed.double()
    return fx, drops


PACK_LIMIT = 512
"""Most tokens in one row's packed tree (the row plus its perturbations from the removed token
on, :class:`~tokattr.engine.packing.Branches`). A packed pass attends over the whole packed
sequence, so its mask and scores grow as the square of its length: longer rows take
key/value-cache passes (:func:`_with_cache`). Where the two cross over on CPU is measured in
``docs/performance.md``."""


def _sharing_prefixes(
    problem: AttributionProblem, rows: Tensor, columns: Tensor, slots: Tensor
) -> tuple[Tensor, Tensor]:
    """``f(x)`` per row and ``f(x without feature slot s)`` per perturbation (``rows``,
    ``columns`` (the feature's first column), ``slots`` ``[P]``), computing each row's columns
    before a removed feature once for all its perturbations. Rows whose tree is short go
    packed (:class:`~tokattr.engine.packing.Branches`), the others through key/value-cache
    passes (:func:`_with_cache`)."""
    device = problem.embeds.device
    fx = torch.empty(problem.n_rows, device=device)
    removed = torch.empty(len(rows), device=device)
    if not problem.branches_ok:  # the model cannot take packed passes: all through the cache
        return _with_cache(problem, rows, columns, slots)
    size, scored = tree_sizes(problem.inputs, columns, rows)  # [batch] each
    per_pass = _packed_rows_per_pass(problem)
    fits = [per_pass(n, k) > 0 for n, k in zip(size.tolist(), scored.tolist(), strict=True)]
    packed = (size <= PACK_LIMIT) & torch.tensor(fits, device=device)
    if not packed.all():
        cached = (~packed).nonzero().squeeze(-1)  # [m] rows
        where = torch.full((problem.n_rows,), -1, dtype=torch.long, device=device)
        where[cached] = torch.arange(len(cached), device=device)
        mine = where[rows] >= 0
        f_sub, r_sub = _with_cache(
            problem.select(cached), where[rows[mine]], columns[mine], slots[mine]
        )
        fx[cached] = f_sub.to(fx.dtype)
        removed[mine] = r_sub.to(removed.dtype)
    trees = packed.nonzero().squeeze(-1).tolist()
    if not trees:
        return fx, removed
    bins, n_per_pass = _plan_passes(trees, size.tolist(), scored.tolist(), per_pass)
    at_row = torch.full((problem.n_rows,), -1, dtype=torch.long, device=device)

    def run(i: int, j: int) -> None:
        group = [r for b in bins[i:j] for r in b]
        r = torch.tensor(group, device=device)
        cols = problem.trim(r)
        at_row[r] = torch.arange(len(r), device=device)
        mine = (at_row[rows] >= 0).nonzero().squeeze(-1)  # the perturbations of these rows
        at = at_row[rows[mine]]  # their rows' positions in r
        at_row[r] = -1
        x = problem.embeds[r][:, cols]
        c = columns[mine] - cols.start
        if problem.grouped:  # a feature of several tokens: the branches' whole embeddings
            p_rows = rows[mine]
            out = (problem.column_feature[p_rows, cols] == slots[mine, None])[..., None]
            base = torch.where(
                out, problem.baselines[p_rows, cols], problem.embeds[p_rows, cols]
            )  # [m, seq', d_model]
        else:
            base = problem.baselines[rows[mine], columns[mine]]  # [m, d_model]: the removed tokens
        packing = torch.tensor([k for k, b in enumerate(bins[i:j]) for _ in b], device=device)
        passes = min(n_per_pass, j - i)
        with torch.inference_mode():
            f = problem.forward(
                x,
                problem.inputs.select(r, cols),
                branches=Branches(at, c, base, packing, passes=passes),
            )
        fx[r] = f[: len(r)].to(fx.dtype)
        removed[mine] = f[len(r) :].to(removed.dtype)

    # Up to PASSES_PER_CALL passes laid out at once; fewer packed sequences a pass (and fewer
    # passes a call) on out-of-memory.
    chunked(len(bins), n_per_pass * PASSES_PER_CALL, run)
    return fx, removed


PASSES_PER_CALL = 4
"""Packed passes whose inputs are laid out, and whose scores are read, in one target call
(:attr:`~tokattr.engine.packing.Branches.passes`): the call's fixed cost (a few dozen small
tensor operations) is paid once for all of them. Only the embeddings and position ids of all of
them are held at once (each pass's attention mask is built for that pass): less than one
pass's activations."""


def _plan_passes(
    trees: list[int], sizes: list[int], scored: list[int], per_pass: Callable[[int, int], int]
) -> tuple[list[list[int]], int]:
    """The rows ``trees`` (``sizes``/``scored``: tokens and scored tokens of each row's tree)
    packed into sequences as wide as the largest tree by first-fit decreasing, and how many of
    those sequences go in a pass (``per_pass(width, scored)``, at least 1). Returns the rows of
    each packed sequence, and that number. One width for every sequence keeps passes full
    (narrower ones for small trees would carry more padding in smaller passes)."""
    trees = sorted(trees, key=lambda r: (-sizes[r], r))
    width = sizes[trees[0]]
    bin_of = first_fit_trees([sizes[r] for r in trees], width)
    bins: list[list[int]] = [[] for _ in range(max(bin_of) + 1)]
    keep = [0] * len(bins)
    for r, b in zip(trees, bin_of, strict=True):
        bins[b].append(r)
        keep[b] += scored[r]
    return bins, max(1, per_pass(width, max(keep)))


def _packed_rows_per_pass(problem: AttributionProblem) -> Callable[[int, int], int]:
    """``(width, scored) -> n``: the most packed sequences of ``width`` tokens, ``scored`` of them
    scored, in a pass that takes no more memory than ``batch_size`` full sequences (by
    :func:`tokattr.engine.memory.packed_rows_per_pass`; by tokens where the model's shape is not
    known); 0 where not even one fits."""
    seq = problem.embeds.shape[1]
    if problem.shape is None:
        return lambda width, scored: problem.batch_size * seq // width
    first = int(problem.inputs.score_mask.any(0).nonzero().min())
    shape, batch_size = problem.shape, problem.batch_size
    return lambda width, scored: packed_rows_per_pass(
        shape, batch_size, seq, seq - first + 1, width, scored
    )


def _with_cache(
    problem: AttributionProblem, rows: Tensor, columns: Tensor, slots: Tensor
) -> tuple[Tensor, Tensor]:
    """``f(x)`` per row and ``f(x without feature slot s)`` per perturbation (``columns``: the
    feature's first column), re-running each
    perturbed sequence only from its first changed column: the earlier columns' key/value
    states come from the unperturbed pass. Perturbations go in column order, in passes of
    like columns, split where a new pass costs less than the columns it saves re-running
    (:func:`tokattr.engine.coalitions.group_passes`, as for the coalition methods)."""
    fx, states = problem.states()
    order = torch.argsort(columns, stable=True)
    rows_s, cols_s, slots_s = rows[order], columns[order], slots[order]

    def run(i: int, j: int) -> Tensor:
        r, c = rows_s[i:j], cols_s[i:j]
        cols = problem.trim(r)  # cols.start <= offset: the left padding ends first
        offset = int(c.min())
        if problem.grouped:  # every token of the feature
            out = (problem.column_feature[r] == slots_s[i:j, None])[..., None]
            x = torch.where(out, problem.baselines[r], problem.embeds[r])
        else:
            x = problem.embeds[r].clone()  # [chunk, seq, d_model]
            at = torch.arange(len(r), device=x.device)
            x[at, c] = problem.baselines[r, c]
        past = Prefix(prefix_cache(states, r, offset, cols.start), offset - cols.start)
        with torch.inference_mode():
            return problem.forward(x[:, cols], problem.inputs.select(r, cols), past=past)

    removed = torch.empty(len(rows), dtype=fx.dtype, device=fx.device)
    parts: list[Tensor] = []
    seq = problem.embeds.shape[1]
    need = seq - cols_s  # columns each perturbation re-runs, non-increasing
    overhead = pass_overhead_tokens(problem) + pass_overhead_tokens(problem, CACHE_PASS_S)
    groups, _ = group_passes(
        need.tolist(), problem.batch_size * seq, overhead, rows_per_cached_pass(problem, seq)
    )
    for g0, g1 in groups:
        parts += chunked(g1 - g0, g1 - g0, lambda i, j, s=g0: run(s + i, s + j))
    removed[order] = torch.cat(parts)
    return fx, removed
