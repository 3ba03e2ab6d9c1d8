"""Occlusion: the drop in the target when a token (or a window of tokens) is removed."""

from __future__ import annotations

from collections.abc import Callable

import captum.attr
import torch
from torch import Tensor

from tokattr.engine.cache import Prefix, prefix_cache
from tokattr.engine.packing import Branches, first_fit_trees, tree_sizes
from tokattr.memory import packed_rows_per_pass
from tokattr.methods.problem import AttributionProblem, MethodOutput, chunked


class Occlusion:
    """Occlusion: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014.

    A token's score is ``f(x) - f(x with the token removed)``; removing replaces its embedding
    by the baseline (pad embedding by default) and keeps its position. With ``window > 1`` a
    window of ``window`` consecutive prompt tokens (BOS is not counted) slides by ``stride``,
    and a token's score is the mean drop over the windows that cover it (Captum's
    ``Occlusion``). Scores are whole-token: nothing to reduce over ``d_model``.

    Batching: single tokens: every perturbation of every row of the batch (plus each row
    unperturbed, ``n + 1`` sequences per row) goes through the model ``batch_size`` sequences
    per forward. With ``prefix_reuse`` (default; built-in targets on models with a key/value
    cache), the columns before a removed token are computed once per row, not once per
    perturbation, so a prompt costs about half of ``n + 1`` full passes; the scores are the
    same (to float rounding):

    - a row whose tree (the row, plus each perturbation from its removed token on) has at most
      :data:`PACK_LIMIT` tokens goes *packed*: the row and its perturbations form one sequence
      whose attention mask lets each perturbation see the row's columns before its removed
      token and its own later ones (tree attention, :class:`~tokattr.targets.Branches`; on
      models that honour a custom 4-D mask, probed once per model). Short trees share a packed
      sequence; a pass holds the memory of ``batch_size`` full sequences.
    - longer rows keep the unperturbed pass's key/value states and re-run each perturbed
      sequence from the removed token on, in bands of like start columns.

    Windows go through Captum's ``Occlusion`` per row on a 0/1 token mask, ``batch_size``
    windows per forward.

    Args:
        window: tokens removed together, >= 1.
        stride: step between windows, 1 <= stride <= window (so every token is covered).
        prefix_reuse: compute each row's columns before a removed token once (single tokens
            only); ``False``: ``n + 1`` full sequences per row.
    """

    def __init__(self, window: int = 1, stride: int = 1, prefix_reuse: bool = True) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"occlusion: window must be an integer >= 1, got {window!r}")
        if not isinstance(stride, int) or not 1 <= stride <= window:
            raise ValueError(f"occlusion: stride must be an integer in [1, window], got {stride!r}")
        if not isinstance(prefix_reuse, bool):
            raise ValueError(f"occlusion: prefix_reuse must be True or False, got {prefix_reuse!r}")
        self.window = window
        self.stride = stride
        self.prefix_reuse = prefix_reuse

    @property
    def packs_branches(self) -> bool:
        """Whether this occlusion may pack perturbations with their rows
        (:class:`~tokattr.targets.Branches`)."""
        return self.window == 1 and self.prefix_reuse

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        if self.window == 1:
            return self._single_tokens(problem)
        return self._windows(problem)

    def _single_tokens(self, problem: AttributionProblem) -> MethodOutput:
        device = problem.embeds.device
        n_max = int(problem.n_features.max())
        slots = torch.arange(n_max, device=device)[None]  # [1, n_max]
        rows, slot = (slots < problem.n_features[:, None]).nonzero(as_tuple=True)  # [P] each
        if self.prefix_reuse and problem.prefix_ok:
            fx, removed = _sharing_prefixes(problem, rows, problem.feature_columns()[rows, slot])
        else:
            # One pass over every perturbation of every row, plus each row unperturbed.
            keep = torch.ones(len(rows) + problem.n_rows, n_max, dtype=torch.bool, device=device)
            keep[torch.arange(len(rows), device=device), slot] = False
            every = torch.arange(problem.n_rows, device=device)
            f = problem.evaluate(torch.cat([rows, every]), keep)
            removed, fx = f[: len(rows)], f[len(rows) :]
        values = torch.zeros(problem.n_rows, n_max, dtype=torch.float64, device=device)
        values[rows, slot] = fx[rows].double() - removed.double()
        return MethodOutput(problem.scatter(values), fx=fx)

    def _windows(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        values = torch.zeros(problem.n_rows, max(n_features))  # [batch, n_max]
        for b, n in enumerate(n_features):
            occ = captum.attr.Occlusion(problem.mask_forward(b))
            attr = occ.attribute(
                torch.ones(1, n, device=problem.embeds.device),
                baselines=0.0,
                sliding_window_shapes=(min(self.window, n),),
                strides=(self.stride,),
                perturbations_per_eval=problem.batch_size,
            )  # [1, n]
            values[b, :n] = attr[0].float().cpu()
        return MethodOutput(problem.scatter(values.to(problem.embeds.device)))


PACK_LIMIT = 512
"""Most tokens in one row's packed tree (the row plus its perturbations from the removed token
on, :class:`~tokattr.targets.Branches`). A packed pass attends over the whole packed sequence
(its mask and scores grow as the square of its length), so longer rows take key/value-cache
passes (:func:`_with_cache`). Measured on 2 CPU cores: on a 100M Llama, packed passes took
0.26-0.31 s per 16-token prompt (trees of about 170 tokens) against 0.39-0.40 s cached, 0.45
against 0.67-0.72 s at 24 tokens (about 350), and the same at 32 tokens (about 590); on the
bundled model the two are even from 24 tokens (about 300) on."""


def _sharing_prefixes(
    problem: AttributionProblem, rows: Tensor, columns: Tensor
) -> tuple[Tensor, Tensor]:
    """``f(x)`` per row and ``f(x without column c)`` per perturbation (``rows``, ``columns``
    ``[P]``), computing each row's columns before a removed token once for all its
    perturbations. Rows whose tree is short go packed (:class:`~tokattr.targets.Branches`),
    the others through key/value-cache passes (:func:`_with_cache`)."""
    device = problem.embeds.device
    fx = torch.empty(problem.n_rows, device=device)
    removed = torch.empty(len(rows), device=device)
    if not problem.branches_ok:  # the model cannot take packed passes: all through the cache
        return _with_cache(problem, rows, columns)
    size, scored = tree_sizes(problem.inputs, columns, rows)  # [batch] each
    per_pass = _packed_rows_per_pass(problem)
    fits = [per_pass(n, k) > 0 for n, k in zip(size.tolist(), scored.tolist(), strict=True)]
    packed = (size <= PACK_LIMIT) & torch.tensor(fits, device=device)
    if not packed.all():
        cached = (~packed).nonzero().squeeze(-1)  # [m] rows
        where = torch.full((problem.n_rows,), -1, dtype=torch.long, device=device)
        where[cached] = torch.arange(len(cached), device=device)
        mine = where[rows] >= 0
        f_sub, r_sub = _with_cache(problem.select(cached), where[rows[mine]], columns[mine])
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
(:attr:`~tokattr.targets.Branches.passes`): the call's fixed cost (a few dozen small tensor
operations) is paid once for all of them. Measured on the bundled model (2 CPU cores, 32
arithmetic prompts, 4 passes): 4.8 ms of occlusion's own work outside the model per batch,
against 6.8 ms with one call per pass. Only the embeddings and position ids of all of them are
held at once (each pass's attention mask is built for that pass): less than one pass's
activations."""


def _plan_passes(
    trees: list[int], sizes: list[int], scored: list[int], per_pass: Callable[[int, int], int]
) -> tuple[list[list[int]], int]:
    """The rows ``trees`` (``sizes``/``scored``: tokens and scored tokens of each row's tree)
    packed into sequences as wide as the largest tree by first-fit decreasing, and how many of
    those sequences go in a pass (``per_pass(width, scored)``, at least 1). Returns the rows of
    each packed sequence, and that number. (Narrower sequences for the passes of smaller trees
    attend over less, but measured no faster on the bundled model: more padding and smaller
    passes.)"""
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
    :func:`tokattr.memory.packed_rows_per_pass`; by tokens where the model's shape is not
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
    problem: AttributionProblem, rows: Tensor, columns: Tensor
) -> tuple[Tensor, Tensor]:
    """``f(x)`` per row and ``f(x without column c)`` per perturbation, re-running each
    perturbed sequence only from its first changed column: the earlier columns' key/value
    states come from the unperturbed pass. Perturbations go in column order, in bands of
    like columns (:func:`_bands`), so a pass's shared prefix is close to each of its
    sequences' own."""
    fx, states = problem.states()
    order = torch.argsort(columns, stable=True)
    rows_s, cols_s = rows[order], columns[order]

    def run(i: int, j: int) -> Tensor:
        r, c = rows_s[i:j], cols_s[i:j]
        cols = problem.trim(r)  # cols.start <= offset: the left padding ends first
        offset = int(c.min())
        x = problem.embeds[r].clone()  # [chunk, seq, d_model]
        at = torch.arange(len(r), device=x.device)
        x[at, c] = problem.baselines[r, c]
        past = Prefix(prefix_cache(states, r, offset, cols.start), offset - cols.start)
        with torch.inference_mode():
            return problem.forward(x[:, cols], problem.inputs.select(r, cols), past=past)

    removed = torch.empty(len(rows), dtype=fx.dtype, device=fx.device)
    parts: list[Tensor] = []
    seq = problem.embeds.shape[1]
    need = seq - cols_s  # columns each perturbation re-runs
    for start, stop in _bands(need):
        # A pass's memory and time go with its tokens: shorter sequences, more per pass.
        size = max(problem.batch_size, problem.batch_size * seq // int(need[start]))
        parts += chunked(stop - start, size, lambda i, j, s=start: run(s + i, s + j))
    removed[order] = torch.cat(parts)
    return fx, removed


BAND_SLACK = 1.3
"""A pass re-runs all its sequences from its leftmost column on; a sequence joins a pass only
if that is at most this many times the columns it needs itself."""


def _bands(need: Tensor) -> list[tuple[int, int]]:
    """Split perturbations sorted by column into runs ``[start, stop)`` whose first one needs
    at most :data:`BAND_SLACK` times the columns of any other (``need`` ``[P]``, non-increasing:
    the columns each perturbation re-runs)."""
    need_list = need.tolist()
    bands, start = [], 0
    for j in range(1, len(need_list) + 1):
        if j == len(need_list) or need_list[start] > BAND_SLACK * need_list[j]:
            bands.append((start, j))
            start = j
    return bands
