"""What every metric's ``update`` receives: one frozen :class:`MetricInputs` per method and
batch (torchmetrics' contract of one ``update`` signature for a collection of metrics).

The quantities several metrics share are computed on first use and kept on the inputs: the
deletion/insertion curves (four metrics), leave-one-out drops, the exact Shapley values (the
reference of ``shapley_error``, kept across methods by :class:`ExactShapleyCache`) and the
scores on the re-initialised model (``randomization_spearman``). A metric declares what it
needs beyond the problem and the scores (:data:`NEEDS`), and the caller supplies it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokattr.engine.loo import leave_one_out
from tokattr.methods.problem import AttributionProblem, Method
from tokattr.metrics.functional import ErasureCurves, SoftErasure, erasure_curves, soft_erasure

NEEDS = frozenset({"method", "labels", "exact_shapley", "random_scores"})
"""What a metric may need besides the problem and the scores: the method (re-run on perturbed
inputs), per-token ground-truth labels, the exact Shapley values, or the method's scores on
the re-initialised model."""


@dataclass(frozen=True, eq=False)
class MetricInputs:
    """One method's scores on one batch, and what the metrics may ask about them.

    Args:
        problem: the batch as the methods saw it (one row per example, scoring its whole
            answer): metrics re-evaluate the model through it, removing a token exactly as
            the methods do.
        scores: ``[batch, seq]`` the method's scores, each feature's on its first column (0
            elsewhere).
        method: the method instance, for metrics that re-run it.
        labels: ``[batch, seq]`` long ground truth per feature (on its first column): 1
            relevant, 0 irrelevant, -1 unknown (the task's labels, e.g. arithmetic roles or a
            lookup's source segment, as data).
        exact_shapley: ``[batch, seq]`` exact Shapley values (NaN rows where not computed),
            or a function computing them on first use.
        random_scores: ``[batch, seq]`` the method's scores on the re-initialised model, or a
            function computing them on first use.
    """

    problem: AttributionProblem
    scores: Tensor
    method: Method | None = None
    labels: Tensor | None = None
    exact_shapley: Tensor | Callable[[], Tensor] | None = None
    random_scores: Tensor | Callable[[], Tensor] | None = None
    _memo: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    @property
    def feature_mask(self) -> Tensor:
        """Where each feature's value sits in ``scores`` (its first column; every feature
        column for single tokens). ``[batch, seq]`` bool on the CPU."""
        return self.problem.lead_mask.cpu()

    def curves(self) -> ErasureCurves:
        """The deletion and insertion curves of these scores, computed once."""
        return self._once("curves", lambda: erasure_curves(self.problem, self.scores))  # type: ignore[return-value]

    def soft(self, n_samples: int) -> SoftErasure:
        """The soft-erasure evaluations of these scores with ``n_samples`` masks per row
        (:func:`~tokattr.metrics.functional.soft_erasure`), computed once for both soft
        metrics."""
        return self._once(  # type: ignore[return-value]
            f"soft{n_samples}", lambda: soft_erasure(self.problem, self.scores, n_samples)
        )

    def leave_one_out(self) -> Tensor:
        """``f(x) - f(x without feature j)`` per feature slot, ``[batch, n_max]`` float64 on the
        CPU (:func:`tokattr.engine.loo.leave_one_out`, occlusion's own primitive)."""
        return self._once("loo", lambda: leave_one_out(self.problem)[1].cpu())

    def computed(self, what: str) -> bool:
        """Whether ``what`` (``"curves"``, ``"loo"`` or one of :data:`NEEDS`) was computed
        for some metric, so a caller can keep it without computing it."""
        return what in self._memo

    def need(self, what: str, metric: str) -> object:
        """The value of ``what`` (one of :data:`NEEDS`), resolved once.

        Raises:
            ValueError: the caller did not supply it.
        """
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"metric {metric!r} needs {what!r}, which these inputs lack")
        if what in ("exact_shapley", "random_scores") and callable(value):
            return self._once(what, value)
        return value

    def _once(self, key: str, make: Callable[[], object]) -> object:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


class ExactShapleyCache:
    """Exact Shapley values per example, computed once and reused by every method scored
    against them (``shapley_error``). A method that gives exact values
    (``gives_exact_shapley``) fills it with its own scores.

    ``key``: anything that identifies an example's inputs (its prompt and answer token ids);
    one cache serves one model, baseline and target function.

    Args:
        max_tokens: examples with more features get no exact values (NaN): 2^n coalitions.
    """

    def __init__(self, max_tokens: int = 16) -> None:
        self.max_tokens = max_tokens
        self._values: dict[Hashable, Tensor | None] = {}

    def __len__(self) -> int:
        return len(self._values)

    def put(self, keys: Sequence[Hashable], feature_mask: Tensor, scores: Tensor) -> None:
        """Store each row's scores at its features (``[batch, seq]`` both)."""
        mask, scores = feature_mask.cpu(), scores.float().cpu()
        for b, key in enumerate(keys):
            self._values[key] = scores[b, mask[b]].clone()

    def reference(self, keys: Sequence[Hashable], problem: AttributionProblem) -> Tensor:
        """The exact Shapley values of the rows of ``problem`` (``keys`` one per row), computed
        for those not cached yet. ``[batch, seq]`` float32 on the CPU, NaN rows for examples
        with more than ``max_tokens`` features."""
        from tokattr.methods.exact_shapley import ExactShapley

        n = problem.n_features.cpu()
        missing = [b for b, k in enumerate(keys) if k not in self._values]
        short = [b for b in missing if int(n[b]) <= self.max_tokens]
        for b in missing:
            self._values[keys[b]] = None
        if short:
            sub = problem.select(torch.tensor(short))
            values = ExactShapley(self.max_tokens).attribute(sub).scores
            self.put([keys[b] for b in short], sub.lead_mask, values)
        mask = problem.lead_mask.cpu()
        out = torch.full(mask.shape, math.nan, dtype=torch.float32)
        for b, key in enumerate(keys):
            value = self._values[key]
            if value is not None:
                out[b] = 0.0
                out[b, mask[b]] = value
        return out
