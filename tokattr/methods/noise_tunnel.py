"""SmoothGrad and VarGrad: a gradient method averaged over noisy copies of the input."""

from __future__ import annotations

import torch
from torch import Tensor

from tokattr.methods.integrated_gradients import IntegratedGradients
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput
from tokattr.methods.sampled_gradients import grad_passes, noisy_inputs, row_groups

BASES = ("saliency", "input_x_gradient", "integrated_gradients")
"""The gradient methods a noise tunnel runs over."""


class SmoothGrad(Method):
    """SmoothGrad: Smilkov, Thorat, Kim, Viégas & Wattenberg, "SmoothGrad: removing noise by
    adding noise", 2017 (arXiv:1706.03825); Captum's ``NoiseTunnel(nt_type="smoothgrad")``.

    The ``base`` method's element-wise attribution (``[seq, d_model]``: ``|grad|`` for
    saliency, ``x * grad`` for input x gradient, ``(x - x') * sum_k w_k grad(...)`` for
    Integrated Gradients with ``n_steps`` Gauss-Legendre nodes) is computed at ``n_samples``
    noisy copies of the input, ``x + e`` with ``e ~ N(0, stdev^2)`` on the feature tokens'
    embeddings only (BOS, padding and the answer stay fixed), and averaged over the copies;
    that mean is then reduced over ``d_model`` as the base method reduces it (L2 norm for
    saliency, sum otherwise). Noise is drawn as Captum draws it, from the row's seed, so a
    seed gives Captum's scores (checked in the tests).

    ``stdev=None`` (default) takes 15% of the range of the row's feature embedding entries,
    the noise level Smilkov et al. recommend (10-20% of the input range).

    Batching: every (row, sample[, step]) point goes through the model ``grad_batch`` points
    per forward + backward pass, rows mixed (Captum runs one input at a time).

    Args:
        base: ``"saliency"`` (default), ``"input_x_gradient"`` or ``"integrated_gradients"``.
        n_samples: noisy copies per row, >= 1.
        stdev: noise standard deviation in embedding units (> 0), or ``None``.
        n_steps: Integrated Gradients nodes per copy (``base="integrated_gradients"`` only).
    """

    statistic = "mean"

    def __init__(
        self,
        base: str = "saliency",
        n_samples: int = 20,
        stdev: float | None = None,
        n_steps: int = 16,
    ) -> None:
        name = type(self).__name__.lower()
        if base not in BASES:
            raise ValueError(f"{name}: unknown base {base!r}; choose from {BASES}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"{name}: n_samples must be an integer >= 1, got {n_samples!r}")
        if stdev is not None and (not isinstance(stdev, int | float) or stdev <= 0):
            raise ValueError(f"{name}: stdev must be a number > 0 or None, got {stdev!r}")
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"{name}: n_steps must be an integer >= 1, got {n_steps!r}")
        self.base = base
        self.n_samples = n_samples
        self.stdev = None if stdev is None else float(stdev)
        self.n_steps = n_steps

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        scores = torch.zeros(problem.feature_mask.shape, dtype=torch.float32)
        for group in row_groups(problem, per_row=2 * self.n_samples):
            scores[group.cpu()] = self._reduce(self._group(problem, group)).cpu()
        scores = scores.to(problem.embeds.device)
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))

    def _group(self, problem: AttributionProblem, group: Tensor) -> Tensor:
        """The base method's element-wise attributions at each noisy copy of the rows
        ``group``, ``[len(group), n_samples, seq, d_model]`` float32."""
        s = self.n_samples
        if self.base == "integrated_gradients":
            nodes, weights = IntegratedGradients(self.n_steps).nodes()
        else:
            nodes, weights = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        device = problem.embeds.device
        seq, d = problem.embeds.shape[1:]
        noisy = noisy_inputs(problem, group, s, self.stdev)  # [g*s, seq, d]
        copies = group.repeat_interleave(s)  # the row of each noisy copy
        base = problem.baselines[copies]
        acc = torch.zeros(len(copies), seq, d, dtype=torch.float32, device=device)
        k = len(nodes)
        copy = torch.arange(len(copies), device=device).repeat_interleave(k)  # [points]
        step = torch.arange(k, device=device).repeat(len(copies))
        alpha = nodes.to(device)[step]
        w = weights.to(device).float()[step]

        def build(i: int, j: int, cols: slice) -> Tensor:
            c = copy[i:j]
            if self.base != "integrated_gradients":
                return noisy[c, cols]
            a = alpha[i:j, None, None].to(noisy.dtype)
            x, b = noisy[c, cols], base[c, cols]
            point = b + a * (x - b)
            keep = problem.feature_mask[copies[c], cols, None]
            return torch.where(keep, point, x)

        def consume(i: int, j: int, cols: slice, grad: Tensor) -> None:
            c = copy[i:j]
            g = grad.float()
            if self.base == "saliency":
                part = g.abs()
            elif self.base == "input_x_gradient":
                part = noisy[c, cols].float() * g
            else:
                part = (noisy[c, cols] - base[c, cols]).float() * (g * w[i:j, None, None])
            acc[:, cols].index_add_(0, c, part)

        grad_passes(problem, copies[copy], build, consume)
        return acc.view(len(group), s, seq, d)

    def _reduce(self, a: Tensor) -> Tensor:
        """``[rows, samples, seq, d_model]`` attributions -> ``[rows, seq]`` scores."""
        mean = a.mean(1)
        return mean.norm(dim=-1) if self.base == "saliency" else mean.sum(-1)


class VarGrad(SmoothGrad):
    """VarGrad: Adebayo, Gilmer, Goodfellow & Kim, "Local Explanation Methods for Deep Neural
    Networks Lack Sensitivity to Parameter Randomization", 2018 (arXiv:1810.03307); Captum's
    ``NoiseTunnel(nt_type="vargrad")``.

    As :class:`SmoothGrad` (same noise, same base methods), but the statistic over the noisy
    copies is the element-wise variance ``E[a^2] - E[a]^2`` (Captum's formula), summed over
    ``d_model``: scores are >= 0 (up to rounding) and measure how much the base attribution
    moves under input noise.
    """

    statistic = "variance"

    def _reduce(self, a: Tensor) -> Tensor:
        mean = a.mean(1)
        return ((a * a).mean(1) - mean * mean).sum(-1)
