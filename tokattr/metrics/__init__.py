"""Faithfulness metrics: does a method tell the truth about the model?

Pure functions in :mod:`tokattr.metrics.functional` (and the model-free arithmetic in
:mod:`tokattr.metrics.ranking`); torchmetrics classes in :mod:`tokattr.metrics.classes`, all
with one ``update(inputs)`` (:class:`~tokattr.metrics.inputs.MetricInputs`);
:data:`METRICS` (:mod:`tokattr.metrics.registry`) maps the names used in every output to the
classes.

The names below load on first use (PEP 562), so the model-free :mod:`~tokattr.metrics.ranking`
imports without the metric classes (torchmetrics, captum, the methods).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    from tokattr.metrics.inputs import (
        ExactShapleyCache,
        MetricInputs,
    )
    from tokattr.metrics.ranking import (
        FRACTIONS,
    )
    from tokattr.metrics.registry import (
        APPLIES_TO,
        METRICS,
        applies,
    )

_EXPORTS = {
    "APPLIES_TO": "tokattr.metrics.registry",
    "FRACTIONS": "tokattr.metrics.ranking",
    "METRICS": "tokattr.metrics.registry",
    "CompletenessError": "tokattr.metrics.classes",
    "Comprehensiveness": "tokattr.metrics.classes",
    "DeletionAUC": "tokattr.metrics.classes",
    "ExactShapleyCache": "tokattr.metrics.inputs",
    "Infidelity": "tokattr.metrics.classes",
    "InsertionAUC": "tokattr.metrics.classes",
    "LooKendallTau": "tokattr.metrics.classes",
    "MaxSensitivity": "tokattr.metrics.classes",
    "MetricInputs": "tokattr.metrics.inputs",
    "PerExampleMetric": "tokattr.metrics.classes",
    "PlausibilityAUPRC": "tokattr.metrics.classes",
    "RandomizationSpearman": "tokattr.metrics.classes",
    "ShapleyError": "tokattr.metrics.classes",
    "Sufficiency": "tokattr.metrics.classes",
    "applies": "tokattr.metrics.registry",
}

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


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokattr.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
