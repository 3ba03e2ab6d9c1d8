"""Input x gradient per token (Captum's ``InputXGradient``)."""

from __future__ import annotations

import captum.attr
import torch

from tokattr.methods.problem import AttributionProblem, MethodOutput


class InputXGradient:
    """Input x gradient: Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box:
    Learning Important Features Through Propagating Activation Differences", 2016
    (arXiv:1605.01713).

    ``x * df/dx`` for each feature token's input embedding ``x``, summed over ``d_model``
    (signed). The implicit baseline is the zero embedding, whatever baseline is chosen.

    Batching: one forward and one backward pass per ``grad_batch`` rows.
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        ixg = captum.attr.InputXGradient(problem.captum_forward)
        parts = []
        for rows in problem.rows(problem.grad_batch):
            attr = ixg.attribute(
                problem.embeds[rows].detach().requires_grad_(),
                additional_forward_args=problem.inputs.select(rows).as_tuple(),
            )  # [chunk, seq, d_model]
            parts.append(attr.float().sum(-1))  # [chunk, seq]
        scores = torch.cat(parts)  # [batch, seq]
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))
