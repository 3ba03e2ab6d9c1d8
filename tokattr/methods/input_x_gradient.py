"""Input x gradient per token."""

from __future__ import annotations

import torch

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class InputXGradient(Method):
    """Input x gradient: Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box:
    Learning Important Features Through Propagating Activation Differences", 2016
    (arXiv:1605.01713).

    ``x * df/dx`` for each feature token's input embedding ``x``, summed over ``d_model``
    (signed). The implicit baseline is the zero embedding, whatever baseline is chosen.

    Batching: one forward and one backward pass per ``grad_batch`` rows, which also gives
    ``f(x)``. Equal to Captum's ``InputXGradient`` (checked in the tests).
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        fx, grad = problem.gradients()  # [batch], [batch, seq, d_model]
        scores = (problem.embeds.float() * grad.float()).sum(-1)  # [batch, seq]
        scores = torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
        return MethodOutput(scores, fx=fx.float())
