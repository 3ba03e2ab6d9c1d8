"""Integrated Gradients in embedding space, every (row, step) pair batched together."""

from __future__ import annotations

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor

from tokattr.methods.problem import AttributionProblem, MethodOutput, chunked

_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


class IntegratedGradients:
    """Integrated Gradients: Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep
    Networks", ICML 2017.

    The path runs from the baseline embeddings to the input embeddings of the prompt's feature
    tokens (BOS, padding and the answer stay fixed); ``(x - x') * sum_k w_k grad f(x' + a_k (x -
    x'))`` is summed over ``d_model``, so scores are signed and add up to ``f(x) - f(baseline)``
    (completeness) as the steps grow. The nodes ``a_k`` and weights ``w_k`` are Captum's for the
    rule (Gauss–Legendre by default), so the scores equal Captum's ``IntegratedGradients`` on
    the embeddings (checked in the tests). The baseline is the one chosen in
    :func:`tokattr.attribute` (pad embedding by default).

    Batching: the ``n_rows x n_steps`` points of every row's path are flattened and go through
    the model ``grad_batch`` sequences per forward + backward pass (rows and steps mixed, so a
    batch of short prompts fills the passes); only one chunk's activations are alive at a time,
    which bounds memory on long prompts, and a chunk that runs out of accelerator memory is
    retried at half the size. ``f(x)`` and ``f(baseline)`` take one more forward per row; the
    convergence delta ``sum(scores) - (f(x) - f(baseline))`` is kept per row.

    Args:
        n_steps: points on the path (quadrature nodes), >= 1.
        rule: quadrature rule: ``"gausslegendre"`` (default) or a Riemann rule
            (``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"``).
    """

    def __init__(self, n_steps: int = 64, rule: str = "gausslegendre") -> None:
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(
                f"integrated_gradients: n_steps must be an integer >= 1, got {n_steps!r}"
            )
        if rule not in _RULES:
            raise ValueError(f"integrated_gradients: unknown rule {rule!r}; choose from {_RULES}")
        self.n_steps = n_steps
        self.rule = rule

    def nodes(self) -> tuple[Tensor, Tensor]:
        """The quadrature nodes on ``[0, 1]`` and their weights (Captum's), float64 ``[n_steps]``
        each."""
        weights, alphas = approximation_parameters(self.rule)
        return (
            torch.tensor(alphas(self.n_steps), dtype=torch.float64),
            torch.tensor(weights(self.n_steps), dtype=torch.float64),
        )

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        device, dtype = problem.embeds.device, problem.embeds.dtype
        alphas, weights = (t.to(device) for t in self.nodes())
        n_rows, n_steps = problem.n_rows, self.n_steps
        diff = problem.embeds - problem.baselines  # [batch, seq, d_model], 0 off the features
        # Flattened (row, step) points, rows of like length together and each row's steps in
        # a run: a chunk holds whole paths where it can, and little padding.
        by_length = problem.by_length(torch.arange(n_rows, device=device))
        rows = by_length.repeat_interleave(n_steps)  # [rows * steps]
        step = torch.arange(n_steps, device=device).repeat(n_rows)  # [rows * steps]
        total = torch.zeros(diff.shape, dtype=torch.float32, device=device)  # sum_k w_k grad_k

        def run(i: int, j: int) -> None:
            r, a = rows[i:j], alphas[step[i:j]]
            cols = problem.trim(r)  # the columns outside are padding in every row of the chunk
            with torch.enable_grad():
                x = problem.baselines[r, cols] + a.to(dtype)[:, None, None] * diff[r, cols]
                x = x.detach().requires_grad_()
                f = problem.forward(x, problem.inputs.select(r, cols))
                (grad,) = torch.autograd.grad(f.sum(), x)
            w = weights[step[i:j]].float()[:, None, None]
            total[:, cols].index_add_(0, r, grad.float() * w)

        chunked(n_rows * n_steps, problem.grad_batch, run)
        scores = (total * diff.float()).sum(-1)  # [batch, seq]
        scores = torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
        # f(x) and f(baseline): 2 forwards per row, for the convergence delta.
        every = torch.arange(n_rows, device=device)
        keep = torch.zeros(2 * n_rows, int(problem.n_features.max()), dtype=torch.bool)
        keep[n_rows:] = True  # the baselines (nothing kept), then the inputs (all kept)
        ends = problem.evaluate(every.repeat(2), keep)  # [2 * batch]
        f_base, fx = ends[:n_rows], ends[n_rows:]
        delta = scores.double().sum(-1) - (fx.double() - f_base.double())
        return MethodOutput(scores=scores, delta=delta.float(), fx=fx.float())
