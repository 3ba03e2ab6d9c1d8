"""Random scores: the control every method should beat."""

from __future__ import annotations

import torch

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class RandomAttribution(Method):
    """Random attribution: i.i.d. standard normal scores per prompt token, no model call.

    The floor of every faithfulness metric (as the random baseline of Adebayo et al.,
    "Sanity Checks for Saliency Maps", NeurIPS 2018, and DeYoung et al., ERASER, ACL 2020).
    Each row draws from its own seed (``torch.Generator``), so a seeded row's scores do not
    depend on its batch; without a seed it draws from the global RNG.
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        values = torch.zeros(problem.n_rows, max(n_features))  # [batch, n_max]
        for b, n in enumerate(n_features):
            seed = problem.seeds[b]
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            values[b, :n] = torch.randn(n, generator=generator)
        return MethodOutput(problem.scatter(values.to(problem.embeds.device)))
