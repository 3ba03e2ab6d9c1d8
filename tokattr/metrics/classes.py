"""Faithfulness metrics as torchmetrics ``Metric``s: thin classes over
:mod:`tokattr.metrics.functional`.

Each metric keeps one ``cat`` state, the per-example values, so that processes can be merged
(torchmetrics gathers the state across ranks on ``compute``) and bootstrap intervals drawn
from them. ``compute`` is the mean over examples where the metric is defined (NaN values, e.g.
a prompt without formatting tokens for plausibility, are left out).

One contract for all: ``update(inputs)`` takes a :class:`~tokattr.metrics.inputs.MetricInputs`
and every class declares ``name``, ``higher_is_better``, what it ``needs`` beyond the problem
and the scores (see :data:`~tokattr.metrics.inputs.NEEDS`), and the methods it
``applies_to`` (``None``: every method). A new metric is a class here (its computation in
:mod:`tokattr.metrics.functional`) and one line in :data:`tokattr.metrics.METRICS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tokattr.metrics import functional as F
from tokattr.metrics.inputs import MetricInputs
from tokattr.metrics.ranking import FRACTIONS
from tokattr.table import fraction_label


def nanmean(values: Tensor) -> Tensor:
    """Mean over the non-NaN entries along dim 0 (NaN where there are none)."""
    if values.numel() == 0:
        return torch.full(values.shape[1:], math.nan, dtype=torch.float64)
    return values.double().nanmean(0)


class PerExampleMetric(Metric):
    """Abstract: a metric with one value per example (``[n]`` or ``[n, K]``), averaged."""

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool
    name: str
    needs: ClassVar[frozenset[str]] = frozenset()
    applies_to: ClassVar[frozenset[str] | None] = None

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, inputs: MetricInputs) -> None:  # type: ignore[override]
        """Append the batch's per-example values."""
        self.values.append(self.per_batch(inputs).detach().double().to(self.device))

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        """One value per example of the batch (``[batch]`` or ``[batch, K]``)."""
        raise NotImplementedError

    def per_example(self) -> Tensor:
        """The values of every example seen (on every rank), in update order."""
        values = self.values
        if isinstance(values, list):
            return dim_zero_cat(values) if values else torch.zeros(0, dtype=torch.float64)
        return values

    def compute(self) -> Tensor:
        return nanmean(self.per_example())


class _FromCurves(PerExampleMetric):
    """Abstract: a metric read off the deletion / insertion curves
    (:func:`~tokattr.metrics.functional.erasure_curves`)."""

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        """From the inputs' curves, computed once for every erasure metric of the batch."""
        return self._from_curves(inputs.curves())

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        raise NotImplementedError


class _ByFraction(_FromCurves):
    """Abstract: a metric at each token fraction k plus the mean over k (AOPC)."""

    def __init__(self, fractions: Sequence[float] = FRACTIONS, **kwargs: object) -> None:
        super().__init__(**kwargs)
        F.top_k_sizes(torch.ones(1, dtype=torch.long), fractions)  # validates
        self.fractions = tuple(float(f) for f in fractions)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """``{"1%": mean, …, "aopc": mean over k}``."""
        values = self.per_example()  # [n, K]
        if values.numel() == 0:
            values = values.reshape(0, len(self.fractions))
        means = nanmean(values)  # [K]
        out = {fraction_label(f): means[i] for i, f in enumerate(self.fractions)}
        out["aopc"] = nanmean(values.mean(-1, keepdim=True))[0]
        return out


class Comprehensiveness(_ByFraction):
    """ERASER comprehensiveness (DeYoung et al., ACL 2020): ``f(x) - f(x without the top-k
    tokens)`` at each k, and their mean (AOPC). Higher is better: removing the tokens a
    faithful method ranks first should hurt the answer most."""

    higher_is_better = True
    name = "comprehensiveness"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.comprehensiveness_from_curves(curves, self.fractions)


class Sufficiency(_ByFraction):
    """ERASER sufficiency (DeYoung et al., ACL 2020): ``f(x) - f(only the top-k tokens)`` at
    each k, and their mean (AOPC). Lower is better: the top tokens alone should keep the
    answer."""

    higher_is_better = False
    name = "sufficiency"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.sufficiency_from_curves(curves, self.fractions)


class DeletionAUC(_FromCurves):
    """Area under the deletion curve in units of ``f`` (Petsiuk et al., BMVC 2018): features
    removed in attribution order, the area of ``f - f(baseline)`` over the fraction removed
    (nats for the default log-probability target). Lower is better."""

    higher_is_better = False
    name = "deletion_auc"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.deletion_auc_from_curves(curves)


class InsertionAUC(_FromCurves):
    """Area under the insertion curve in units of ``f`` (Petsiuk et al., BMVC 2018): features
    inserted into the baseline in attribution order. Higher is better."""

    higher_is_better = True
    name = "insertion_auc"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.insertion_auc_from_curves(curves)


class _Normalised(_FromCurves):
    """Abstract: an erasure area on ``f`` rescaled by ``f(x) - f(baseline)``, kept only where
    that gap is at least ``min_gap`` (in units of ``f``)."""

    def __init__(self, min_gap: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not min_gap > 0:
            raise ValueError(f"{self.name}: min_gap must be > 0, got {min_gap!r}")
        self.min_gap = float(min_gap)


class DeletionAUCNormalised(_Normalised):
    """Area under the deletion curve with ``f`` rescaled to 1 at the full prompt and 0 with
    every feature removed (Petsiuk et al., BMVC 2018), on the examples where ``|f(x) -
    f(baseline)| >= min_gap`` (the others are left out and counted). Lower is better."""

    higher_is_better = False
    name = "deletion_auc_normalised"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.deletion_auc_normalised_from_curves(curves, self.min_gap)


class InsertionAUCNormalised(_Normalised):
    """Area under the rescaled insertion curve (0 with no feature, 1 with all), on the
    examples where ``|f(x) - f(baseline)| >= min_gap``. Higher is better."""

    higher_is_better = True
    name = "insertion_auc_normalised"

    def _from_curves(self, curves: F.ErasureCurves) -> Tensor:
        return F.insertion_auc_normalised_from_curves(curves, self.min_gap)


class _Soft(PerExampleMetric):
    """Abstract: a soft-erasure metric (Zhao & Aletras, ACL 2023) over ``n_samples`` masks, on
    the examples where removing every feature lowers the answer's probability by at least
    ``min_gap`` (the others are left out and counted)."""

    higher_is_better = True

    def __init__(self, n_samples: int = 8, min_gap: float = 0.01, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"{self.name}: n_samples must be an integer >= 1, got {n_samples!r}")
        if not 0 < min_gap < 1:
            raise ValueError(f"{self.name}: min_gap must lie in (0, 1), got {min_gap!r}")
        self.n_samples, self.min_gap = n_samples, float(min_gap)


class SoftSufficiency(_Soft):
    """Soft normalised sufficiency, Soft-NS (Zhao & Aletras, "Incorporating Attribution
    Importance for Improving Faithfulness Metrics", ACL 2023): each feature's embedding
    elements kept with probability its min-max normalised importance, the rest set to the
    baseline; how much of the answer's probability above the empty prompt's survives.
    Higher is better."""

    name = "soft_sufficiency"

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return F.soft_sufficiency_from(inputs.soft(self.n_samples), self.min_gap)


class SoftComprehensiveness(_Soft):
    """Soft normalised comprehensiveness, Soft-NC (Zhao & Aletras, ACL 2023): each feature's
    embedding elements kept with probability one minus its normalised importance; the drop
    of the answer's probability, over the drop with every feature removed. Higher is
    better."""

    name = "soft_comprehensiveness"

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return F.soft_comprehensiveness_from(inputs.soft(self.n_samples), self.min_gap)


class LooKendallTau(PerExampleMetric):
    """Kendall tau-b between the scores and the drop in ``f`` when each token alone is
    removed (leave-one-out agreement). Higher is better; occlusion with the same baseline
    scores exactly 1."""

    higher_is_better = True
    name = "loo_kendall_tau"

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return F.loo_kendall_tau(inputs.problem, inputs.scores, inputs.leave_one_out())


class Infidelity(PerExampleMetric):
    """Infidelity (Yeh et al., NeurIPS 2019) as ``captum.metrics.infidelity`` computes it,
    reported as its square root: the root-mean-square gap, in units of ``f``, between the
    drop the (optimally rescaled) scores predict for a perturbation and the drop that
    happens. Perturbations remove each feature with probability ``remove_prob`` (or, with
    ``perturbation="gaussian"``, move every feature by ``N(0, noise_std^2)`` along its
    baseline-to-input segment); see :func:`tokattr.metrics.functional.infidelity`. Lower is
    better."""

    higher_is_better = False
    name = "infidelity"

    def __init__(
        self,
        n_perturb_samples: int = 32,
        perturbation: str = "removal",
        remove_prob: float = 0.25,
        noise_std: float = 0.1,
        normalize: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if n_perturb_samples < 1 or noise_std <= 0 or not 0 < remove_prob < 1:
            raise ValueError(
                "infidelity: n_perturb_samples must be >= 1, noise_std > 0 and 0 < remove_prob "
                f"< 1, got {n_perturb_samples!r}, {noise_std!r}, {remove_prob!r}"
            )
        if perturbation not in F.PERTURBATIONS:
            raise ValueError(
                f"infidelity: perturbation must be one of {F.PERTURBATIONS}, got {perturbation!r}"
            )
        self.n_perturb_samples, self.perturbation = n_perturb_samples, perturbation
        self.remove_prob, self.noise_std, self.normalize = remove_prob, noise_std, normalize

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return (
            F.infidelity(
                inputs.problem,
                inputs.scores,
                self.n_perturb_samples,
                self.perturbation,
                self.remove_prob,
                self.noise_std,
                self.normalize,
            )
            .clamp(min=0)
            .sqrt()
        )  # Captum's expanded square can round below 0 on a perfect fit


class MaxSensitivity(PerExampleMetric):
    """Max-sensitivity (Yeh et al., NeurIPS 2019) as ``captum.metrics.sensitivity_max``
    computes it, on the prompt tokens' embeddings; the method is re-run on every perturbed
    input. Lower is better."""

    higher_is_better = False
    name = "max_sensitivity"
    needs = frozenset({"method"})

    def __init__(
        self, perturb_radius: float = 0.02, n_perturb_samples: int = 8, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        if n_perturb_samples < 1 or perturb_radius <= 0:
            raise ValueError(
                "max_sensitivity: n_perturb_samples must be >= 1 and perturb_radius > 0, got "
                f"{n_perturb_samples!r}, {perturb_radius!r}"
            )
        self.perturb_radius, self.n_perturb_samples = perturb_radius, n_perturb_samples

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        method = inputs.need("method", self.name)
        return F.max_sensitivity(
            inputs.problem, inputs.scores, method, self.perturb_radius, self.n_perturb_samples
        )


class CompletenessError(PerExampleMetric):
    """Relative completeness error of Integrated Gradients (Sundararajan et al., ICML 2017):
    ``|sum(scores) - (f(x) - f(baseline))| / |f(x) - f(baseline)|``. Lower is better.
    Reported for ``integrated_gradients``, and for ``random`` as the control."""

    higher_is_better = False
    name = "completeness_error"
    applies_to = frozenset({"integrated_gradients", "random"})  # random: the control

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return F.completeness_error(inputs.problem, inputs.scores)


class ShapleyError(PerExampleMetric):
    """Relative L2 distance of a Shapley estimate to the exact Shapley values (all 2^n
    coalitions; Lundberg & Lee, NeurIPS 2017; Castro et al., 2009). Lower is better. Rows
    whose exact values are NaN (too long to enumerate) are left out."""

    higher_is_better = False
    name = "shapley_error"
    needs = frozenset({"exact_shapley"})
    applies_to = frozenset({"kernel_shap", "shapley_sampling", "random"})  # random: the control

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        exact = inputs.need("exact_shapley", self.name)
        return F.shapley_error(inputs.scores.cpu(), exact, inputs.feature_mask)


class _AgainstLabels(PerExampleMetric):
    """A metric of the scores against the ground-truth labels alone (no model call):
    ``score(scores, labels)``, both ``[batch, seq]`` on the CPU."""

    higher_is_better = True
    needs = frozenset({"labels"})
    score: ClassVar[Callable[[Tensor, Tensor], Tensor]]

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        labels = inputs.need("labels", self.name)
        return type(self).score(inputs.scores.cpu(), labels)


class PlausibilityAUPRC(_AgainstLabels):
    """Normalised AUPRC of ``|score|`` for the relevant features (label 1: an arithmetic
    operand's digits, sign and decimal point and the operator, or a lookup's source) against
    the irrelevant ones (label 0: formatting, demonstrations, the other segments):
    ``(AP - E[AP]) / (1 - E[AP])``, 0 for random scores and 1 for the relevant features on
    top. Higher is better."""

    name = "plausibility_auprc"
    score = staticmethod(F.plausibility_auprc)


class PlausibilityPrecision(_AgainstLabels):
    """Normalised top-k precision (k = the number of relevant features): the share of the
    top-k that is relevant, rescaled so that random scores 0 and the relevant features on
    top 1. Higher is better."""

    name = "plausibility_precision"
    score = staticmethod(F.plausibility_precision)


class PlausibilityTop1(_AgainstLabels):
    """Whether the feature with the largest ``|score|`` is a relevant one (label 1): on the
    lookup task, whether the top segment is the definition the answer came from. Higher is
    better; ``random`` scores about one over the number of candidates."""

    name = "plausibility_top1"
    score = staticmethod(F.plausibility_top1)


class LDS(PerExampleMetric):
    """Linear datamodeling score (Park et al., ICML 2023; Cohen-Wang et al., NeurIPS 2024):
    Spearman correlation between the sum of the removed features' scores and the actual drop
    of ``f``, over random ablations that keep each feature with probability ``keep_prob``.
    Higher is better."""

    higher_is_better = True
    name = "lds"

    def __init__(self, n_ablations: int = 32, keep_prob: float = 0.5, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_ablations, int) or n_ablations < 2 or not 0 < keep_prob < 1:
            raise ValueError(
                "lds: n_ablations must be an integer >= 2 and 0 < keep_prob < 1, got "
                f"{n_ablations!r}, {keep_prob!r}"
            )
        self.n_ablations, self.keep_prob = n_ablations, keep_prob

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        return F.lds(inputs.problem, inputs.scores, self.n_ablations, self.keep_prob)


class RandomizationSpearman(PerExampleMetric):
    """Spearman correlation between scores on the model and on the same architecture with
    re-initialised weights (Adebayo et al., NeurIPS 2018). Lower is better: a method whose
    scores do not change with the weights does not explain the model."""

    higher_is_better = False
    name = "randomization_spearman"
    needs = frozenset({"random_scores"})

    def per_batch(self, inputs: MetricInputs) -> Tensor:
        random_scores = inputs.need("random_scores", self.name)
        return F.randomization_spearman(inputs.scores.cpu(), random_scores, inputs.feature_mask)
