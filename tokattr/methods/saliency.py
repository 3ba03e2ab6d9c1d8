"""Saliency: the gradient's L2 norm per token (Captum's ``Saliency``)."""

from __future__ import annotations

import captum.attr
import torch

from tokattr.methods.problem import AttributionProblem, MethodOutput


class Saliency:
    """Saliency: Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks:
    Visualising Image Classification Models and Saliency Maps", 2013 (arXiv:1312.6034).

    The gradient of the target with respect to each feature token's input embedding, reduced
    over ``d_model`` by its L2 norm, so scores are >= 0. No baseline is used.

    Batching: one forward and one backward pass per ``grad_batch`` rows.
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        saliency = captum.attr.Saliency(problem.captum_forward)
        parts = []
        for rows in problem.rows(problem.grad_batch):
            grads = saliency.attribute(
                problem.embeds[rows].detach().requires_grad_(),
                additional_forward_args=problem.inputs.select(rows).as_tuple(),
                abs=True,
            )  # [chunk, seq, d_model]
            parts.append(grads.float().norm(dim=-1))  # [chunk, seq]
        scores = torch.cat(parts)  # [batch, seq]
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))
