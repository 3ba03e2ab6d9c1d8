"""Checks of the metrics themselves: can a metric tell the methods from the ``random`` control
on this data, how fine is it, and does it rank the methods as the other metrics do?

A benchmark is only as good as its metrics, and a metric can be flat on a model and data set
(Hedström et al., "The Meta-Evaluation Problem in Explainable AI: Identifying Reliable
Estimators with MetaQuantus", TMLR 2023, argue for checking metrics before trusting them).
Every run therefore reports, per metric:

- its **separation** from the control, for each method: the mean over examples of the
  method's value minus ``random``'s on the same example, signed so that positive is better,
  with a paired percentile-bootstrap interval (examples resampled, the pairs kept together;
  Efron & Tibshirani, 1993). ``discriminates`` when the interval excludes 0 (either sign: a
  metric that ranks a method reliably below random still tells the two apart) over at least
  :data:`MIN_PAIRS` examples;
- its **resolution**: the median width of the methods' intervals over the spread of their
  means (below 1, the intervals are narrower than the differences between methods);
- its **rank agreement**: the mean Kendall tau between its ranking of the methods and each
  other metric's (both oriented so that better ranks first).

A metric that cannot tell any method from ``random`` is flagged :data:`NOT_DISCRIMINATING`
in the summary table; a metric on which the control has too few values, or the same value on
every example by construction, is not flagged but says so (:attr:`MetricCheck.verdict`).
Model-free: per-example values in, rows out (``metric_sanity.csv``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokattr.metrics.ranking import kendall_tau

if TYPE_CHECKING:
    from tokattr.table import MetricRow

CONTROL = "random"
"""The method every other is compared with."""

HEADLINE_K = ("", "aopc")
"""The one number per metric that is checked: plain metrics, and the ERASER metrics' AOPC."""

SANITY_COLUMNS = ("metric", "method", "effect", "ci_low", "ci_high", "discriminates")
"""The columns of ``metric_sanity.csv``, one row per metric x method other than the control."""

NOT_DISCRIMINATING = "does not discriminate on this data"

MIN_PAIRS = 10
"""Fewer paired examples than this and a percentile bootstrap interval means little: no method
is declared told from the control on them."""


@dataclass(frozen=True)
class Separation:
    """A method against the control on one metric: ``effect`` = mean of (method - control)
    over the examples where both are defined, signed so that positive is better, and its
    paired bootstrap interval."""

    metric: str
    method: str
    effect: float
    ci_low: float
    ci_high: float
    discriminates: bool


@dataclass(frozen=True)
class MetricCheck:
    """One metric's check over all methods (see the module docstring). ``control``: the
    ``random`` control's values on this metric: ``"ok"``, ``"missing"`` (no value on any
    example, or fewer than :data:`MIN_PAIRS`) or ``"constant"`` (the same on every example:
    random scores ignore the input and the weights, so ``max_sensitivity`` is 0 and
    ``randomization_spearman`` 1 by construction, and telling a method from them is
    trivial)."""

    metric: str
    methods: int  # methods compared with the control
    discriminated: int  # of which the interval excludes 0
    resolution: float  # median interval width / spread of the means (NaN: < 2 methods)
    rank_agreement: float  # mean Kendall tau with the other metrics' rankings (NaN: none)
    control: str = "ok"

    @property
    def verdict(self) -> str:
        """What the check says, in a few words."""
        if self.control == "missing":
            return f"{CONTROL} has too few values (< {MIN_PAIRS})"
        if self.methods == 0:
            return "no method to compare"
        if self.control == "constant":
            return f"{CONTROL} is constant by construction"
        return NOT_DISCRIMINATING if self.discriminated == 0 else "ok"

    @property
    def flagged(self) -> bool:
        """Whether no method could be told from a control that has values to compare."""
        return self.verdict == NOT_DISCRIMINATING


def paired_interval(
    diff: Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of the mean of paired differences (NaN pairs
    dropped): ``(mean, low, high)``, NaNs where no pair is left."""
    d = diff.double().flatten()
    d = d[~d.isnan()]
    if d.numel() == 0:
        return math.nan, math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    means = d[torch.randint(d.numel(), (n_resamples, d.numel()), generator=gen)].mean(-1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(d.mean()), float(low), float(high)


def separations(
    values: Mapping[tuple[str, str, str], Tensor],
    higher_is_better: Mapping[str, bool],
    n_resamples: int = 1000,
    control: str = CONTROL,
) -> list[Separation]:
    """Every method's separation from ``control`` on every metric the control has.

    Args:
        values: ``{(method, metric, k): [n examples]}``, each method's values on the same
            examples in the same order (NaN where undefined or not scored).
        higher_is_better: each metric's direction.
    """
    out = []
    for (method, metric, k), v in values.items():
        if method == control or k not in HEADLINE_K or (control, metric, k) not in values:
            continue
        ref = values[(control, metric, k)]
        if ref.shape != v.shape:
            raise ValueError(
                f"{metric}: {method} has {v.shape[0]} values and {control} {ref.shape[0]}; "
                "paired values must cover the same examples"
            )
        sign = 1.0 if higher_is_better[metric] else -1.0
        diff = sign * (v.double() - ref.double())
        effect, low, high = paired_interval(diff, n_resamples)
        enough = int((~diff.isnan()).sum()) >= MIN_PAIRS
        separated = enough and not math.isnan(low) and (low > 0 or high < 0)
        out.append(Separation(metric, method, effect, low, high, separated))
    return out


def metric_checks(rows: Sequence[MetricRow], seps: Sequence[Separation]) -> list[MetricCheck]:
    """One :class:`MetricCheck` per metric of a table's ``rows`` (headline k only), in their
    order, from the rows' means and intervals and the separations ``seps``."""
    cells = {(r.method, r.metric): r for r in rows if r.k in HEADLINE_K}
    metrics = list(dict.fromkeys(metric for _, metric in cells))
    oriented: dict[str, dict[str, float]] = {}
    resolution: dict[str, float] = {}
    for metric in metrics:
        mine = {m: r for (m, name), r in cells.items() if name == metric and not math.isnan(r.mean)}
        oriented[metric] = {m: (1 if r.higher_is_better else -1) * r.mean for m, r in mine.items()}
        means = [r.mean for r in mine.values()]
        widths = [r.ci_high - r.ci_low for r in mine.values()]
        spread = max(means) - min(means) if len(means) >= 2 else math.nan
        width = float(torch.tensor(widths).median()) if widths else math.nan
        resolution[metric] = (
            math.nan if math.isnan(spread) else (math.inf if spread == 0 else width / spread)
        )
    out = []
    for metric in metrics:
        taus = []
        for other in metrics:
            common = sorted(set(oriented[metric]) & set(oriented[other]))
            if other == metric or len(common) < 3:
                continue
            a = torch.tensor([[oriented[metric][m] for m in common]])
            b = torch.tensor([[oriented[other][m] for m in common]])
            tau = float(kendall_tau(a, b, torch.ones_like(a, dtype=torch.bool))[0])
            if not math.isnan(tau):
                taus.append(tau)
        against = [s for s in seps if s.metric == metric]
        ref = cells.get((CONTROL, metric))
        if ref is None or ref.n < MIN_PAIRS or math.isnan(ref.mean):
            control = "missing"
        elif ref.ci_high == ref.ci_low:  # every resample has the same mean: one value
            control = "constant"
        else:
            control = "ok"
        out.append(
            MetricCheck(
                metric,
                len(against),
                sum(s.discriminates for s in against),
                resolution[metric],
                sum(taus) / len(taus) if taus else math.nan,
                control,
            )
        )
    return out


def best_separation(seps: Sequence[Separation], metric: str) -> Separation | None:
    """The method with the largest effect on ``metric`` (``None``: no defined effect)."""
    defined = [s for s in seps if s.metric == metric and not math.isnan(s.effect)]
    return max(defined, key=lambda s: s.effect, default=None)


def _number(x: float, digits: int = 2) -> str:
    return "—" if math.isnan(x) else ("∞" if math.isinf(x) else f"{x:.{digits}f}")


def sanity_markdown(checks: Sequence[MetricCheck], seps: Sequence[Separation]) -> str:
    """The "Metric checks" section of ``summary.md``: one line per metric."""
    lines = [
        "## Metric checks",
        "",
        f"| metric | methods told from {CONTROL} | best effect [95% paired interval] | "
        "resolution | rank agreement | verdict |",
        "|---|---:|---|---:|---:|---|",
    ]
    for c in checks:
        best = best_separation(seps, c.metric)
        shown = (
            "—"
            if best is None
            else f"{best.method}: {_number(best.effect, 3)} [{_number(best.ci_low, 3)}, "
            f"{_number(best.ci_high, 3)}]"
        )
        lines.append(
            f"| {c.metric} | {c.discriminated}/{c.methods} | {shown} | {_number(c.resolution)} "
            f"| {_number(c.rank_agreement)} | {c.verdict} |"
        )
    lines += [
        "",
        f"Effect: the method's mean minus {CONTROL}'s on the same examples, signed so that "
        "positive is better; told from the control when its paired 95% bootstrap interval "
        "excludes 0 (per method: metric_sanity.csv). Resolution: median interval width over "
        "the spread of the methods' means (below 1: finer than the differences). Rank "
        "agreement: mean Kendall tau with the other metrics' rankings of the methods.",
    ]
    return "\n".join(lines)


def write_sanity_csv(path: str | Path, seps: Sequence[Separation]) -> Path:
    """Write ``metric_sanity.csv`` (:data:`SANITY_COLUMNS`)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SANITY_COLUMNS)
        for s in seps:
            w.writerow([getattr(s, c) for c in SANITY_COLUMNS])
    return path


def read_sanity_csv(path: str | Path) -> list[Separation]:
    """The rows of a ``metric_sanity.csv``.

    Raises:
        ValueError: other columns than :data:`SANITY_COLUMNS`.
    """
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SANITY_COLUMNS:
            raise ValueError(
                f"{path}: columns {reader.fieldnames}, expected {list(SANITY_COLUMNS)}"
            )
        return [
            Separation(
                r["metric"],
                r["method"],
                float(r["effect"]),
                float(r["ci_low"]),
                float(r["ci_high"]),
                r["discriminates"] == "True",
            )
            for r in reader
        ]
