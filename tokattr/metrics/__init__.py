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

from tokattr._lazy import lazy_exports

_MODULES = {
    "tokattr.metrics.classes": (
        "CompletenessError",
        "Comprehensiveness",
        "DeletionAUC",
        "DeletionAUCNormalised",
        "Infidelity",
        "InsertionAUC",
        "InsertionAUCNormalised",
        "LooKendallTau",
        "MaxSensitivity",
        "PerExampleMetric",
        "PlausibilityAUPRC",
        "PlausibilityPrecision",
        "RandomizationSpearman",
        "ShapleyError",
        "SoftComprehensiveness",
        "SoftSufficiency",
        "Sufficiency",
    ),
    "tokattr.metrics.inputs": ("ExactShapleyCache", "MetricInputs"),
    "tokattr.metrics.ranking": ("FRACTIONS",),
    "tokattr.metrics.registry": ("APPLIES_TO", "METRICS", "applies"),
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
