"""Figures and a self-contained HTML report of a finished ``tokattr bench`` run.

Post-processing of the files in a run's ``out_dir`` (see :mod:`tokattr.results`): no model,
no Lightning, no W&B.

- :mod:`~tokattr.report.load`: :func:`load_run` reads the run into a frozen :class:`Run`
  of :class:`~tokattr.rows.ResultRow`; :func:`method_costs` is each method's own cost.
- :mod:`~tokattr.report.figures`: :func:`example_heatmap`, :func:`erasure_curves_figure`,
  :func:`agreement_figure`, :func:`metrics_figure` and the numbers behind them.
- :mod:`~tokattr.report.html`: :func:`write_report`, the PNGs and ``report.html``.

The names below are loaded on first use (PEP 562): reading a run or its costs
(:mod:`tokattr.report.load`) does not import matplotlib or the metrics, which only the
figures need.
"""

from __future__ import annotations

from tokattr._lazy import lazy_exports

_MODULES = {
    "tokattr.report.load": (
        "CSV_COLUMNS",
        "Cost",
        "Run",
        "headline_metrics",
        "load_run",
        "method_costs",
    ),
    "tokattr.report.figures": (
        "MeanCurves",
        "agreement_figure",
        "agreement_matrix",
        "erasure_curves_figure",
        "example_heatmap",
        "example_scores",
        "format_score",
        "mean_erasure_curves",
        "metrics_figure",
        "normalised_curves",
    ),
    "tokattr.report.html": ("write_report",),
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
