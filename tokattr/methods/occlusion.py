"""Occlusion: the drop in the target when a token (or a window of tokens) is removed."""

from __future__ import annotations

import captum.attr
import torch

from tokattr.engine import loo  # a module, not its names: loo imports this package
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class Occlusion(Method):
    """Occlusion: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014.

    A token's score is ``f(x) - f(x with the token removed)``; removing replaces its embedding
    by the baseline (pad embedding by default) and keeps its position. With ``window > 1`` a
    window of ``window`` consecutive prompt tokens (BOS is not counted) slides by ``stride``,
    and a token's score is the mean drop over the windows that cover it (Captum's
    ``Occlusion``). Scores are whole-token: nothing to reduce over ``d_model``.

    Batching: single tokens: every perturbation of every row of the batch (plus each row
    unperturbed, ``n + 1`` sequences per row) goes through the model ``batch_size`` sequences
    per forward. With ``prefix_reuse`` (default; built-in targets on models with a key/value
    cache), the columns before a removed token are computed once per row, not once per
    perturbation, so a prompt costs about half of ``n + 1`` full passes; the scores are the
    same (to float rounding):

    - a row whose tree (the row, plus each perturbation from its removed token on) has at most
      :data:`PACK_LIMIT` tokens goes *packed*: the row and its perturbations form one sequence
      whose attention mask lets each perturbation see the row's columns before its removed
      token and its own later ones (tree attention, :class:`~tokattr.engine.packing.Branches`; on
      models that honour a custom 4-D mask, probed once per model). Short trees share a packed
      sequence; a pass holds the memory of ``batch_size`` full sequences.
    - longer rows keep the unperturbed pass's key/value states and re-run each perturbed
      sequence from the removed token on, in passes of like start columns split where a
      new pass costs less than the columns it saves re-running (as the coalition methods).

    Windows go through Captum's ``Occlusion`` per row on a 0/1 token mask, ``batch_size``
    windows per forward.

    Args:
        window: tokens removed together, >= 1.
        stride: step between windows, 1 <= stride <= window (so every token is covered).
        prefix_reuse: compute each row's columns before a removed token once (single tokens
            only); ``False``: ``n + 1`` full sequences per row.
    """

    def __init__(self, window: int = 1, stride: int = 1, prefix_reuse: bool = True) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"occlusion: window must be an integer >= 1, got {window!r}")
        if not isinstance(stride, int) or not 1 <= stride <= window:
            raise ValueError(f"occlusion: stride must be an integer in [1, window], got {stride!r}")
        if not isinstance(prefix_reuse, bool):
            raise ValueError(f"occlusion: prefix_reuse must be True or False, got {prefix_reuse!r}")
        self.window = window
        self.stride = stride
        self.prefix_reuse = prefix_reuse

    @property
    def packs_branches(self) -> bool:  # type: ignore[override]
        """Single-token occlusion with prefix reuse packs perturbations with their rows
        (:class:`~tokattr.engine.packing.Branches`); windows do not."""
        return self.window == 1 and self.prefix_reuse

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        if self.window == 1:
            return self._single_tokens(problem)
        return self._windows(problem)

    def _single_tokens(self, problem: AttributionProblem) -> MethodOutput:
        fx, drops = loo.leave_one_out(problem, share_prefixes=self.prefix_reuse)
        return MethodOutput(problem.scatter(drops), fx=fx)

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
