"""Integrated Gradients in embedding space (Captum's ``IntegratedGradients``)."""

from __future__ import annotations

import captum.attr
import torch

from tokattr.methods.problem import AttributionProblem, MethodOutput

_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


class IntegratedGradients:
    """Integrated Gradients: Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep
    Networks", ICML 2017.

    The path runs from the baseline embeddings to the input embeddings of the prompt's feature
    tokens (BOS, padding and the answer stay fixed); ``(x - x') * mean gradient`` is summed over
    ``d_model``, so scores are signed and add up to ``f(x) - f(baseline)`` (completeness). The
    baseline is the one chosen in :func:`tokattr.attribute` (pad embedding by default).

    Batching: the ``n_steps`` points of the path go through the model ``batch_size`` sequences
    per forward (Captum's ``internal_batch_size``), the rows of a batch together. The
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

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        ig = captum.attr.IntegratedGradients(problem.captum_forward)
        attr, delta = ig.attribute(
            problem.embeds,
            baselines=problem.baselines,
            additional_forward_args=problem.inputs.as_tuple(),
            n_steps=self.n_steps,
            method=self.rule,
            internal_batch_size=max(problem.batch_size, problem.n_rows),
            return_convergence_delta=True,
        )  # [batch, seq, d_model], [batch]
        scores = attr.float().sum(-1)  # [batch, seq]
        scores = torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
        return MethodOutput(scores=scores, delta=delta.detach().float())
