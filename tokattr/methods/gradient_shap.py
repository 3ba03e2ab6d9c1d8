"""GradientShap: expected gradients between the baseline and (noisy) inputs."""

from __future__ import annotations

import numpy as np
import torch

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput
from tokattr.methods.sampled_gradients import grad_passes, noisy_inputs, row_groups


class GradientShap(Method):
    """GradientShap: Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions",
    NeurIPS 2017 (the expected-gradients approximation of SHAP values; Captum's
    ``GradientShap``).

    For each of ``n_samples`` samples a row's feature embeddings get Gaussian noise of
    standard deviation ``stdev`` (``x_s = x + e``, ``e ~ N(0, stdev^2)``), a point
    ``a x_s + (1 - a) x'`` is drawn uniformly on the segment from the baseline ``x'``, and
    ``(x_s - x') * grad f`` there is the sample's attribution; the scores are its mean over
    the samples, summed over ``d_model`` (signed; the sum of a row's scores approximates
    ``f(x) - f(x')`` in expectation). The baseline distribution is the single baseline chosen in
    :func:`tokattr.attribute` (pad embedding by default); BOS, padding and the answer stay
    fixed. Draws follow Captum's order from the row's seed (NumPy for the baseline index and
    ``a``, torch for the noise), so a seed gives Captum's samples and scores (checked in the
    tests).

    Batching: every (row, sample) point goes through the model ``grad_batch`` points per
    forward + backward pass, rows mixed (Captum runs one input at a time).

    Args:
        n_samples: samples per row, >= 1.
        stdev: standard deviation of the input noise in embedding units, >= 0 (Captum's
            default, 0: no noise).
    """

    def __init__(self, n_samples: int = 20, stdev: float = 0.0) -> None:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"gradient_shap: n_samples must be an integer >= 1, got {n_samples!r}")
        if not isinstance(stdev, int | float) or stdev < 0:
            raise ValueError(f"gradient_shap: stdev must be a number >= 0, got {stdev!r}")
        self.n_samples = n_samples
        self.stdev = float(stdev)

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        scores = torch.zeros(problem.feature_mask.shape, dtype=torch.float32)
        for group in row_groups(problem, per_row=self.n_samples):
            scores[group.cpu()] = self._group(problem, group).cpu()
        scores = scores.to(problem.embeds.device)
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))

    def _group(self, problem: AttributionProblem, group: torch.Tensor) -> torch.Tensor:
        """The scores ``[len(group), seq]`` of the rows ``group``."""
        s = self.n_samples
        rngs = {}

        def choose(r: int) -> None:
            seed = problem.seeds[r]
            rngs[r] = np.random if seed is None else np.random.RandomState(seed)
            rngs[r].choice(1, s)  # Captum draws the baseline's index (one baseline here)

        noisy = noisy_inputs(problem, group, s, self.stdev, before=choose)  # [g*s, seq, d]
        alpha = torch.cat([torch.tensor(rngs[r].uniform(0.0, 1.0, s)) for r in group.tolist()]).to(
            device=noisy.device, dtype=noisy.dtype
        )  # [g*s]
        rows = group.repeat_interleave(s)
        base = problem.baselines[rows]
        acc = torch.zeros(len(rows), noisy.shape[1], dtype=torch.float32, device=noisy.device)

        def build(i: int, j: int, cols: slice) -> torch.Tensor:
            a = alpha[i:j, None, None]
            point = a * noisy[i:j, cols] + (1.0 - a) * base[i:j, cols]  # Captum's _scale_input
            keep = problem.feature_mask[rows[i:j], cols, None]
            return torch.where(keep, point, problem.embeds[rows[i:j], cols])

        def consume(i: int, j: int, cols: slice, grad: torch.Tensor) -> None:
            diff = (noisy[i:j, cols] - base[i:j, cols]).float()
            acc[i:j, cols] = (diff * grad.float()).sum(-1)

        grad_passes(problem, rows, build, consume)
        return acc.view(len(group), s, -1).mean(1)  # [g, seq]
