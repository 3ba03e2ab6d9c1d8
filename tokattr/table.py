"""The method x metric table: per-example values -> mean and a percentile-bootstrap
interval per (method, metric, k) (Efron & Tibshirani, "An Introduction to the Bootstrap",
1993), as markdown and as ``metrics.csv``.

Reading a table back (:meth:`EvaluationTable.from_csv`) needs no model code: only building
one from values looks the metrics up.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tokattr.attribution import Attribution
    from tokattr.sanity import MetricCheck, Separation

CSV_COLUMNS = ("method", "metric", "k", "mean", "ci_low", "ci_high", "higher_is_better", "n")
"""The columns of ``metrics.csv``, one row per (method, metric, k)."""


def fraction_label(f: float) -> str:
    """``0.05 -> "5%"``: how a token fraction k is named in outputs."""
    return f"{f * 100:g}%"


@dataclass(frozen=True)
class MetricRow:
    """One cell of the table: a method's mean of a metric (at token fraction ``k`` for the
    ERASER metrics: ``"1%"`` … ``"50%"`` or ``"aopc"``, their mean; ``""`` otherwise)."""

    method: str
    metric: str
    k: str
    mean: float
    ci_low: float
    ci_high: float
    higher_is_better: bool
    n: int  # examples where the metric is defined


@dataclass(frozen=True)
class EvaluationTable:
    """The result of :func:`evaluate`: one :class:`MetricRow` per (method, metric, k), the
    per-example values behind them, and the attributions."""

    rows: list[MetricRow]
    values: dict[tuple[str, str, str], Tensor] = field(repr=False)  # [n examples] float64
    attributions: dict[str, list[Attribution]] = field(repr=False)
    sanity: list[Separation] = field(default_factory=list, repr=False)
    """Each method against the ``random`` control per metric (:mod:`tokattr.sanity`), where
    the table has the control."""

    @property
    def checks(self) -> list[MetricCheck]:
        """One check per metric (:func:`tokattr.sanity.metric_checks`), empty without a
        control."""
        from tokattr.sanity import metric_checks

        return metric_checks(self.rows, self.sanity) if self.sanity else []

    def get(self, method: str, metric: str, k: str | None = None) -> MetricRow:
        """The row of ``method`` and ``metric`` (``k`` defaults to ``"aopc"`` for the ERASER
        metrics and ``""`` for the others)."""
        if k is None:
            k = "aopc" if metric in ("comprehensiveness", "sufficiency") else ""
        for row in self.rows:
            if (row.method, row.metric, row.k) == (method, metric, k):
                return row
        raise KeyError(f"no row for method {method!r}, metric {metric!r}, k {k!r}")

    def to_markdown(self, per_k: bool = False) -> str:
        """A method x metric table, ``mean [ci_low, ci_high]`` per cell, each column headed by
        its direction (↑ higher is better, ↓ lower is better). ``per_k`` adds one column per
        token fraction of the ERASER metrics."""
        columns: list[tuple[str, str, bool]] = []
        for r in self.rows:
            if (per_k or r.k in ("", "aopc")) and (r.metric, r.k, r.higher_is_better) not in (
                columns
            ):
                columns.append((r.metric, r.k, r.higher_is_better))
        methods = list(dict.fromkeys(r.method for r in self.rows))
        cells = {(r.method, r.metric, r.k): r for r in self.rows}
        checks = {c.metric: c for c in self.checks}
        flagged = {m for m, c in checks.items() if c.flagged}
        head = ["method"] + [
            f"{m}{'' if k in ('', 'aopc') else '@' + k} {'↑' if hi else '↓'}"
            + (" ⚠" if m in flagged and k in ("", "aopc") else "")
            for m, k, hi in columns
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            row = [method]
            for m, k, _ in columns:
                r = cells.get((method, m, k))
                row.append("—" if r is None or r.n == 0 else _cell(r))
            lines.append("| " + " | ".join(row) + " |")
        if checks:
            from tokattr.sanity import CONTROL

            told = [
                f"{checks[m].discriminated}/{checks[m].methods}"
                if m in checks and k in ("", "aopc") and checks[m].methods
                else ""
                for m, k, _ in columns
            ]
            lines.append(f"| *told from {CONTROL}* | " + " | ".join(told) + " |")
        lines.append("")
        lines.append(
            "↑ higher is better, ↓ lower is better; mean over examples [95% bootstrap interval]; "
            "comprehensiveness and sufficiency are AOPC (mean over k = "
            + ", ".join(dict.fromkeys(r.k for r in self.rows if r.k not in ("", "aopc")))
            + " of the prompt tokens); — : does not apply."
        )
        if flagged:
            from tokattr.sanity import CONTROL, NOT_DISCRIMINATING

            lines.append(
                f"⚠ {NOT_DISCRIMINATING}: " + ", ".join(sorted(flagged)) + f" (no method's "
                f"paired 95% interval against {CONTROL} excludes 0; see the metric checks)."
            )
        partial = sorted(
            {(r.metric, r.n) for r in self.rows if r.k in ("", "aopc") and 0 < r.n < self.n_max}
        )
        if partial:
            lines.append(
                f"Defined on fewer than the {self.n_max} examples: "
                + ", ".join(f"{m} (n = {n})" for m, n in partial)
                + "; the rest are undefined for that metric and left out."
            )
        return "\n".join(lines)

    @property
    def n_max(self) -> int:
        """The most examples any cell is computed over (the run's scored examples)."""
        return max((r.n for r in self.rows), default=0)

    def to_csv(self, path: str | Path) -> Path:
        """Write :data:`CSV_COLUMNS`, one line per row."""
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in self.rows:
                w.writerow([getattr(r, c) for c in CSV_COLUMNS])
        return path

    @classmethod
    def from_csv(cls, path: str | Path) -> EvaluationTable:
        """The rows of a ``metrics.csv`` written by :meth:`to_csv` (no per-example values)."""
        rows = []
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                rows.append(
                    MetricRow(
                        method=r["method"],
                        metric=r["metric"],
                        k=r["k"],
                        mean=float(r["mean"]),
                        ci_low=float(r["ci_low"]),
                        ci_high=float(r["ci_high"]),
                        higher_is_better=r["higher_is_better"] == "True",
                        n=int(r["n"]),
                    )
                )
        return cls(rows=rows, values={}, attributions={})


def _cell(r: MetricRow) -> str:
    return f"{format_value(r.mean)} [{format_value(r.ci_low)}, {format_value(r.ci_high)}]"


def format_value(x: float) -> str:
    """Three decimals, or three significant digits where that would print a non-zero value as
    0.000 (``2.8e-05`` -> ``2.80e-05``) or a large one very long (``1.23e+06``)."""
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 5e-4 or abs(x) >= 1e6):
        return f"{x:.2e}"
    return f"{x:.3f}"


def bootstrap_interval(
    values: Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean and percentile-bootstrap interval of the mean over the non-NaN ``values``.
    Returns ``(mean, low, high, n)``; NaNs where there is no value."""
    v = values.double().flatten()
    v = v[~v.isnan()]
    n = v.numel()
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=gen)
    means = v[idx].mean(-1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(v.mean()), float(low), float(high), n


def metric_fractions(name: str, metric_params: Mapping[str, Mapping[str, object]] | None) -> tuple:
    """The token fractions of an ERASER metric with these parameters."""
    from tokattr.metrics import METRICS

    return tuple(METRICS[name](**dict((metric_params or {}).get(name, {}))).fractions)


def table_from_values(
    values: Mapping[tuple[str, str], Tensor],
    metric_params: Mapping[str, Mapping[str, object]] | None,
    n_bootstrap: int = 1000,
    attributions: dict[str, list[Attribution]] | None = None,
) -> EvaluationTable:
    """The method x metric table of per-example values ``{(method, metric): [n] or [n, K]}``."""
    from tokattr.metrics import METRICS
    from tokattr.sanity import separations

    rows, out = [], {}
    for (method, name), v in values.items():
        if v.ndim == 2:  # one column per token fraction, then their mean (AOPC)
            fractions = metric_fractions(name, metric_params)
            columns = {fraction_label(f): v[:, i] for i, f in enumerate(fractions)}
            columns["aopc"] = v.mean(-1)
        else:
            columns = {"": v}
        for k, col in columns.items():
            mean, low, high, n = bootstrap_interval(col, n_bootstrap)
            higher = METRICS[name].higher_is_better
            rows.append(MetricRow(method, name, k, mean, low, high, higher, n))
            out[(method, name, k)] = col
    higher = {name: METRICS[name].higher_is_better for _, name in values}
    return EvaluationTable(
        rows=rows,
        values=out,
        attributions=attributions or {},
        sanity=separations(out, higher, n_bootstrap),
    )
