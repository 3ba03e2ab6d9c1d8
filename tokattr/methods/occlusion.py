"""Occlusion: the drop in the target when a token (or a window of tokens) is removed."""

from __future__ import annotations

import captum.attr
import torch

from tokattr.methods.problem import AttributionProblem, MethodOutput


class Occlusion:
    """Occlusion: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014.

    A token's score is ``f(x) - f(x with the token removed)``; removing replaces its embedding
    by the baseline (pad embedding by default) and keeps its position. With ``window > 1`` a
    window of ``window`` consecutive prompt tokens (BOS is not counted) slides by ``stride``,
    and a token's score is the mean drop over the windows that cover it (Captum's
    ``Occlusion``). Scores are whole-token: nothing to reduce over ``d_model``.

    Batching: single tokens go through Captum's ``FeatureAblation`` on the embeddings, every
    row of the batch at once and ``batch_size // rows`` tokens per forward; windows go through
    Captum's ``Occlusion`` per row on a 0/1 token mask, ``batch_size`` windows per forward.

    Args:
        window: tokens removed together, >= 1.
        stride: step between windows, 1 <= stride <= window (so every token is covered).
    """

    def __init__(self, window: int = 1, stride: int = 1) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"occlusion: window must be an integer >= 1, got {window!r}")
        if not isinstance(stride, int) or not 1 <= stride <= window:
            raise ValueError(f"occlusion: stride must be an integer in [1, window], got {stride!r}")
        self.window = window
        self.stride = stride

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        if self.window == 1:
            return self._single_tokens(problem)
        return self._windows(problem)

    def _single_tokens(self, problem: AttributionProblem) -> MethodOutput:
        # Feature k of every row is ablated in the same forward; non-feature columns join
        # group 0, where the baseline equals the input, so ablating them changes nothing.
        rank = problem.feature_mask.long().cumsum(-1) - 1  # [batch, seq]
        groups = torch.where(problem.feature_mask, rank, torch.zeros_like(rank))
        ablation = captum.attr.FeatureAblation(problem.captum_forward)
        attr = ablation.attribute(
            problem.embeds,
            baselines=problem.baselines,
            additional_forward_args=problem.inputs.as_tuple(),
            feature_mask=groups[..., None],  # [batch, seq, 1]
            perturbations_per_eval=max(1, problem.batch_size // problem.n_rows),
        )  # [batch, seq, d_model], constant over d_model
        scores = attr[..., 0].float()  # [batch, seq]
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))

    def _windows(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        values = torch.zeros(problem.n_rows, max(n_features))  # [batch, n_max]
        for b, n in enumerate(n_features):
            occ = captum.attr.Occlusion(problem.mask_forward(b))
            attr = occ.attribute(
                torch.ones(1, n, device=problem.embeds.device),
                baselines=0.0,
                sliding_window_shapes=(min(self.window, n),),
                strides=(self.stride,),
                perturbations_per_eval=problem.batch_size,
            )  # [1, n]
            values[b, :n] = attr[0].float().cpu()
        return MethodOutput(problem.scatter(values.to(problem.embeds.device)))
