"""The metric registry: the names used in every output table -> the classes. Adding a metric
is its class (:mod:`tokattr.metrics.classes`) and one line here."""

from __future__ import annotations

from collections.abc import Collection

from tokattr.metrics.classes import (
    LDS,
    CompletenessError,
    Comprehensiveness,
    DeletionAUC,
    DeletionAUCNormalised,
    Infidelity,
    InsertionAUC,
    InsertionAUCNormalised,
    LooKendallTau,
    MaxSensitivity,
    PerExampleMetric,
    PlausibilityAUPRC,
    PlausibilityPrecision,
    PlausibilityTop1,
    RandomizationSpearman,
    ShapleyError,
    SoftComprehensiveness,
    SoftSufficiency,
    Sufficiency,
)

METRICS: dict[str, type[PerExampleMetric]] = {
    "comprehensiveness": Comprehensiveness,
    "sufficiency": Sufficiency,
    "deletion_auc": DeletionAUC,
    "insertion_auc": InsertionAUC,
    "deletion_auc_normalised": DeletionAUCNormalised,
    "insertion_auc_normalised": InsertionAUCNormalised,
    "soft_sufficiency": SoftSufficiency,
    "soft_comprehensiveness": SoftComprehensiveness,
    "loo_kendall_tau": LooKendallTau,
    "infidelity": Infidelity,
    "max_sensitivity": MaxSensitivity,
    "completeness_error": CompletenessError,
    "shapley_error": ShapleyError,
    "plausibility_auprc": PlausibilityAUPRC,
    "plausibility_precision": PlausibilityPrecision,
    "plausibility_top1": PlausibilityTop1,
    "lds": LDS,
    "randomization_spearman": RandomizationSpearman,
}
"""Metric name -> class (explicit; the names are those of every output table)."""

APPLIES_TO: dict[str, frozenset[str]] = {
    name: cls.applies_to for name, cls in METRICS.items() if cls.applies_to is not None
}
"""Metrics that only make sense for some methods (each class's ``applies_to``); the rest
apply to every method."""


def applies(metric: str, method: str, methods: Collection[str] | None = None) -> bool:
    """Whether ``metric`` is computed for ``method``. Given the run's ``methods``, a metric
    of a few methods (``applies_to``) is computed for the ``random`` control only when one of
    those methods is in the run: the control is there to be compared with them."""
    allowed = METRICS[metric].applies_to
    if allowed is None:
        return True
    if method not in allowed:
        return False
    if method == "random" and methods is not None:
        return any(m != "random" and m in allowed for m in methods)
    return True
