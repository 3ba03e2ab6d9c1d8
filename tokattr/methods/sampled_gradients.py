"""Gradients at many sampled points per row: the machinery of GradientShap and the noise
tunnel (SmoothGrad, VarGrad).

Each row gets ``n_samples`` noisy copies of its feature embeddings, drawn as Captum's
``NoiseTunnel`` draws them (one ``torch.normal`` call per row on the CPU, from the row's
seed), and every (row, sample[, path step]) point goes through the model ``grad_batch``
points per forward + backward pass, rows of like length together. Element-wise attributions
are accumulated per (row, sample) on the full ``[seq, d_model]`` grid, so rows are taken in
groups whose accumulators stay within :data:`ACCUMULATOR_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokattr.methods.problem import AttributionProblem, chunked, seeded

ACCUMULATOR_BYTES = 1 << 28
"""Most bytes of per-(row, sample) element-wise accumulators alive at once (256 MiB)."""

SMILKOV_NOISE = 0.15
"""Default noise level: this fraction of the range (max - min) of the row's feature
embedding entries, in the 10-20% Smilkov et al. (2017, sec. 3.2) found best."""


def feature_noise(problem: AttributionProblem, row: int, n_samples: int, stdev: float) -> Tensor:
    """``n_samples`` Gaussian noise draws on row ``row``'s feature columns, 0 elsewhere, drawn
    as Captum's ``NoiseTunnel`` draws them for an input of the row's feature embeddings
    (``[1, n_tokens, d_model]``): ``torch.normal(0, std)`` with ``std`` of shape
    ``[n_samples, n_tokens, d_model]``, float32, on the CPU, from the global RNG (call it under
    :func:`~tokattr.methods.problem.seeded`). ``[n_samples, seq, d_model]`` float32 (CPU)"""
    cols = problem.feature_mask[row].nonzero()[:, 0].cpu()
    d = problem.embeds.shape[-1]
    draw = torch.normal(0.0, torch.full((n_samples, len(cols), d), float(stdev)))
    out = torch.zeros(n_samples, problem.embeds.shape[1], d)
    out[:, cols] = draw
    return out


def default_stdev(problem: AttributionProblem, row: int) -> float:
    """:data:`SMILKOV_NOISE` times the range of row ``row``'s feature embedding entries."""
    x = problem.embeds[row][problem.feature_mask[row]].float()
    return float(SMILKOV_NOISE * (x.max() - x.min())) if x.numel() else 0.0


def row_groups(problem: AttributionProblem, per_row: int) -> list[Tensor]:
    """The rows in length order (:meth:`~AttributionProblem.by_length`), split into groups whose
    ``per_row`` accumulators of ``[seq, d_model]`` float32 each fit :data:`ACCUMULATOR_BYTES`."""
    rows = torch.arange(problem.n_rows, device=problem.embeds.device)
    rows = rows[problem.by_length(rows)]
    seq, d = problem.embeds.shape[1:]
    size = max(1, ACCUMULATOR_BYTES // max(1, per_row * seq * d * 4))
    return list(rows.split(size))


def grad_passes(
    problem: AttributionProblem,
    rows: Tensor,
    build: Callable[[int, int, slice], Tensor],
    consume: Callable[[int, int, slice, Tensor], None],
) -> None:
    """Forward + backward at ``len(rows)`` points, ``grad_batch`` per pass.

    Args:
        rows: ``[points]`` the row of each point (like-length rows adjacent: a pass keeps only
            the columns its rows attend to, :meth:`~AttributionProblem.trim`).
        build: ``(i, j, cols) -> [j - i, len(cols), d_model]`` the inputs of points ``i..j``
            on columns ``cols`` (model dtype).
        consume: ``(i, j, cols, grad)`` receives the gradient of the target at those inputs
            (same shape).
    """

    def run(i: int, j: int) -> None:
        r = rows[i:j]
        cols = problem.trim(r)
        _, grad = problem.value_and_grad(build(i, j, cols), r, cols)
        consume(i, j, cols, grad)

    chunked(len(rows), problem.shared_grad_batch, run)


def noisy_inputs(
    problem: AttributionProblem,
    group: Tensor,
    n_samples: int,
    stdev: float | None,
    before: Callable[[int], None] | None = None,
) -> Tensor:
    """Each row of ``group`` plus its ``n_samples`` noise draws (:func:`feature_noise`, from
    the row's seed; ``stdev=None``: :func:`default_stdev` per row), in the model dtype.
    ``before(row)`` runs first under the row's seed (a method's own draws that come before
    the noise in Captum's order). ``[len(group) * n_samples, seq, d_model]``"""
    out = []
    for r in group.tolist():
        with seeded(problem.seeds[r]):
            if before is not None:
                before(r)
            sd = default_stdev(problem, r) if stdev is None else stdev
            noise = feature_noise(problem, r, n_samples, sd).to(problem.embeds.device)
        out.append((problem.embeds[r].float() + noise).to(problem.embeds.dtype))
    return torch.cat(out)
