"""Saliency: the gradient's L2 norm per token."""

from __future__ import annotations

import torch

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class Saliency(Method):
    """Saliency: Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks:
    Visualising Image Classification Models and Saliency Maps", 2013 (arXiv:1312.6034).

    The gradient of the target with respect to each feature token's input embedding, reduced
    over ``d_model`` by its L2 norm, so scores are >= 0. No baseline is used.

    Batching: one forward and one backward pass per ``grad_batch`` rows, which also gives
    ``f(x)``. Equal to Captum's ``Saliency`` with ``abs=True`` reduced the same way (checked in
    the tests).
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        fx, grad = problem.gradients()  # [batch], [batch, seq, d_model]
        scores = grad.float().norm(dim=-1)  # [batch, seq]
        scores = torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
        return MethodOutput(scores, fx=fx.float())
