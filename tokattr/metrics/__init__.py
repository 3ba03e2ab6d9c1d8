"""Faithfulness metrics: does a method tell the truth about the model?

Pure functions in :mod:`tokattr.metrics.functional` (and the model-free arithmetic in
:mod:`tokattr.metrics.ranking`); torchmetrics classes in :mod:`tokattr.metrics.classes`.
:data:`METRICS` maps the names used in every output to the classes.
"""

from __future__ import annotations

from tokattr.metrics.classes import (
    CompletenessError,
    Comprehensiveness,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    LooKendallTau,
    MaxSensitivity,
    PerExampleMetric,
    PlausibilityAUPRC,
    RandomizationSpearman,
    ShapleyError,
    Sufficiency,
)
from tokattr.metrics.inputs import ExactShapleyCache, MetricInputs
from tokattr.metrics.ranking import FRACTIONS

METRICS: dict[str, type[PerExampleMetric]] = {
    "comprehensiveness": Comprehensiveness,
    "sufficiency": Sufficiency,
    "deletion_auc": DeletionAUC,
    "insertion_auc": InsertionAUC,
    "loo_kendall_tau": LooKendallTau,
    "infidelity": Infidelity,
    "max_sensitivity": MaxSensitivity,
    "completeness_error": CompletenessError,
    "shapley_error": ShapleyError,
    "plausibility_auprc": PlausibilityAUPRC,
    "randomization_spearman": RandomizationSpearman,
}
"""Metric name -> class (explicit; the names are those of every output table)."""

APPLIES_TO: dict[str, frozenset[str]] = {
    name: cls.applies_to for name, cls in METRICS.items() if cls.applies_to is not None
}
"""Metrics that only make sense for some methods (each class's ``applies_to``); the rest
apply to every method."""


def applies(metric: str, method: str) -> bool:
    """Whether ``metric`` is computed for ``method``."""
    allowed = METRICS[metric].applies_to
    return allowed is None or method in allowed


__all__ = [
    "APPLIES_TO",
    "FRACTIONS",
    "METRICS",
    "CompletenessError",
    "Comprehensiveness",
    "DeletionAUC",
    "ExactShapleyCache",
    "Infidelity",
    "InsertionAUC",
    "LooKendallTau",
    "MaxSensitivity",
    "MetricInputs",
    "PerExampleMetric",
    "PlausibilityAUPRC",
    "RandomizationSpearman",
    "ShapleyError",
    "Sufficiency",
    "applies",
]
