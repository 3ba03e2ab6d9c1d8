"""The report's figures, drawn from a :class:`~tokattr.report.load.Run` (no model).

- :func:`example_heatmap`: one example's tokens x methods (the seed figure's layout).
- :func:`erasure_curves_figure`: mean normalised deletion / insertion curves (Petsiuk et al.,
  "RISE", 2018), each example normalised by the rule of the deletion / insertion AUC metrics.
- :func:`agreement_figure`: mean Spearman rank correlation between methods.
- :func:`metrics_figure`: the headline metrics with their bootstrap intervals.

Figures are drawn on a bare :class:`~matplotlib.figure.Figure` (Agg canvas), never through
pyplot, as in :mod:`tokattr.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokattr.metrics.ranking import normalised_curve, spearman
from tokattr.plots import COLORBAR_LABEL, COLORMAP, plot_token_heatmap
from tokattr.report.load import Run, headline_metrics

GRID_POINTS = 21  # common x grid of the mean erasure curves: 0, 0.05, ..., 1
DPI = 110  # PNGs of the report: readable, and the HTML stays a few MB at most


def example_scores(run: Run, example_id: str) -> tuple[list[str], list[str], np.ndarray]:
    """One example's raw scores, methods side by side: ``(tokens, methods, [tokens, methods])``.

    Methods that could not score the example (error rows) are left out.

    Raises:
        KeyError: no such example.
        ValueError: no method scored it; methods disagree on its tokens; non-finite scores.
    """
    example_id = str(example_id)
    if example_id not in run.example_ids:
        raise KeyError(f"no example {example_id!r} in {run.out_dir}")
    rows = [r for m in run.methods if (r := run.row(example_id, m)) and r.scores]
    if not rows:
        raise ValueError(f"example {example_id!r}: no method scored it")
    tokens = rows[0].units
    for r in rows[1:]:
        if r.units != tokens:
            raise ValueError(
                f"example {example_id!r}: {r.method} has features {r.units}, "
                f"{rows[0].method} has {tokens}"
            )
    raw = np.array([r.scores for r in rows], dtype=float).T  # [tokens, methods]
    if not np.isfinite(raw).all():
        raise ValueError(f"example {example_id!r}: non-finite scores")
    return list(tokens), [r.method for r in rows], raw


def example_heatmap(run: Run, example_id: str, *, dpi: int = DPI) -> Figure:
    """One example's attributions: its tokens as rows, one column per method.

    Methods differ in scale by orders of magnitude (saliency ~0.01, integrated gradients
    ~±25), so colours show each column divided by its largest ``|score|`` (every column spans
    the whole colour bar), while each cell prints the method's **raw** score.

    Returns:
        The figure of :func:`tokattr.plots.plot_token_heatmap`: ``fig.axes[0]`` the heatmap
        (its image ``[tokens, methods]``, normalised), ``fig.axes[1]`` the colour bar.
    """
    tokens, methods, raw = example_scores(run, example_id)  # [tokens, methods]
    scale = np.abs(raw).max(axis=0)  # [methods]
    scale[scale == 0] = 1.0  # an all-zero column stays 0, not NaN
    row = run.row(example_id, methods[0])
    assert row is not None
    title = (
        f"{example_id}: {_short(row.prompt)} → {_short(row.answer or '')}\n"
        "colour: each column ÷ its max |score|; numbers: raw scores"
    )
    fig = plot_token_heatmap(
        raw / scale,
        tokens,
        methods,
        title=_literal(title),
        colorbar_label=f"{COLORBAR_LABEL} (÷ max |score| of the method)",
        dpi=dpi,
    )
    # plot_token_heatmap prints the matrix it colours (row by row); print the raw scores
    # instead, keeping its choice of black or white text for each cell's colour.
    cells = fig.axes[0].texts
    for text, value in zip(cells, raw.flat, strict=True):
        text.set_text(format_score(float(value)))
    return fig


def format_score(v: float) -> str:
    """A raw score in a heatmap cell: four decimals (as the seed figure) in the usual range,
    scientific notation where four decimals would show 0.0000 or too many digits."""
    if (v != 0 and abs(v) < 1e-3) or abs(v) >= 1e5:
        return f"{v:.1e}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]  # the query is at the end


def _literal(text: str) -> str:
    """Text matplotlib shows as it is: ``$`` (in every arithmetic prompt) would start
    mathtext when two of them appear."""
    return text.replace("$", r"\$")


class MeanCurves(NamedTuple):
    """One method's normalised erasure curves, averaged over examples on a common grid."""

    x: np.ndarray  # [points] fraction of tokens removed / inserted, 0..1
    deletion: np.ndarray  # [points] starts at 1 (f(x)), ends at 0 (f(baseline))
    insertion: np.ndarray  # [points] starts at 0, ends at 1
    n: int  # examples averaged


def normalised_curves(
    deletion: Sequence[float], insertion: Sequence[float], x: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """One example's deletion and insertion curves (``n + 1`` values each, drawn at ``i / n``)
    as ``(f - f(baseline)) / (f(x) - f(baseline))``, linearly interpolated at ``x``:
    ``[n + 1] -> [len(x)]`` each.

    The normalisation is the deletion / insertion AUC metrics' own
    (:func:`~tokattr.metrics.ranking.normalised_curve`: f(x) = ``deletion[0]``, f(baseline)
    = ``insertion[0]`` = ``deletion[-1]``), so the figure shows the curves those metrics
    integrate. None where ``|f(x) - f(baseline)|`` is at most
    :data:`~tokattr.metrics.ranking.GAP_EPS` (removing every token changes nothing: no
    scale to normalise by).
    """
    d = torch.tensor([deletion], dtype=torch.float64)  # [1, n + 1]
    i = torch.tensor([insertion], dtype=torch.float64)  # [1, n + 1]
    fx, fb = d[:, 0], i[:, 0]
    norm_d, norm_i = normalised_curve(d, fx, fb)[0], normalised_curve(i, fx, fb)[0]  # [n + 1]
    if norm_d.isnan().any():
        return None
    return _resample(norm_d.numpy(), x), _resample(norm_i.numpy(), x)


def _resample(f: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.interp(x, np.linspace(0.0, 1.0, len(f)), f)  # [n + 1] -> [len(x)]


def mean_erasure_curves(run: Run, points: int = GRID_POINTS) -> dict[str, MeanCurves]:
    """Per method, the mean normalised deletion and insertion curves (Petsiuk et al. 2018;
    see :func:`normalised_curves`).

    Examples without curves, with non-finite values, or with ``|f(x) - f(baseline)| <= 1e-6``
    (removing every token changes nothing: no scale to normalise by) are skipped; methods
    left with no example are absent.
    """
    x = np.linspace(0.0, 1.0, points)  # [points]
    out: dict[str, MeanCurves] = {}
    for method in run.methods:
        deletion, insertion = [], []
        for e in run.example_ids:
            curves = row.curves if (row := run.row(e, method)) else None
            if not curves or len(curves.get("deletion") or []) < 2:
                continue
            d, i = curves["deletion"], curves.get("insertion") or []
            if len(i) < 2 or any(v is None or not math.isfinite(v) for v in [*d, *i]):
                continue
            normalised = normalised_curves(d, i, x)
            if normalised is None:
                continue
            deletion.append(normalised[0])
            insertion.append(normalised[1])
        if deletion:
            out[method] = MeanCurves(
                x, np.mean(deletion, axis=0), np.mean(insertion, axis=0), len(deletion)
            )
    return out


def erasure_curves_figure(run: Run, points: int = GRID_POINTS, *, dpi: int = DPI) -> Figure:
    """Mean normalised deletion (left) and insertion (right) curves, one line per method
    (see :func:`mean_erasure_curves`; the legend gives the examples averaged).

    A faithful method's deletion curve falls fast (top-ranked tokens removed first matter
    most) and its insertion curve rises fast. ``fig.axes[0]`` deletion, ``fig.axes[1]``
    insertion; the lines of both are in method order.
    """
    curves = mean_erasure_curves(run, points)
    fig = Figure(figsize=(11, 4.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_del, ax_ins = fig.subplots(1, 2, sharey=True)
    for method, c in curves.items():
        # One colour per method in both panels: its place among all methods of the run.
        color = f"C{run.methods.index(method) % 10}"
        label = f"{method} (n={c.n})"
        ax_del.plot(c.x, c.deletion, color=color, label=label, marker=".")
        ax_ins.plot(c.x, c.insertion, color=color, label=label, marker=".")
    ax_del.set_title("Deletion, top-ranked first (lower is better)")
    ax_ins.set_title("Insertion, top-ranked first (higher is better)")
    ax_del.set_xlabel("fraction of tokens removed")
    ax_ins.set_xlabel("fraction of tokens inserted")
    ax_del.set_ylabel("(f − f(baseline)) / (f(x) − f(baseline))")
    for ax in (ax_del, ax_ins):
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    if curves:
        ax_ins.legend(loc="best", fontsize=8)
    else:
        ax_del.text(0.5, 0.5, "no curves in this run", ha="center", transform=ax_del.transAxes)
    return fig


def agreement_matrix(run: Run) -> tuple[list[str], np.ndarray]:
    """Mean over examples of the Spearman rank correlation between two methods' scores of the
    same example (:func:`tokattr.metrics.ranking.spearman`).

    Examples one of the two methods could not score, or where either method's scores are
    constant (rank correlation undefined), are left out of that pair's mean; a pair with no
    example left is NaN. The diagonal is 1.

    Returns:
        ``(methods, matrix)``: ``matrix[i, j]`` for ``methods[i]`` and ``methods[j]``,
        ``[methods, methods]`` float64, symmetric.
    """
    methods, ids = list(run.methods), list(run.example_ids)
    lengths = [len(r.scores) for r in run.rows if r.scores]
    n_max = max(lengths, default=1)
    scores = torch.zeros(len(methods), len(ids), n_max, dtype=torch.float64)
    mask = torch.zeros(len(methods), len(ids), n_max, dtype=torch.bool)
    for i, m in enumerate(methods):
        for b, e in enumerate(ids):
            s = row.scores if (row := run.row(e, m)) else None
            if s:
                scores[i, b, : len(s)] = torch.tensor(s, dtype=torch.float64)
                mask[i, b, : len(s)] = True
    matrix = np.eye(len(methods))
    for i in range(len(methods)):
        for j in range(i + 1, len(methods)):
            # Both methods must have scored the example, over the same tokens.
            same = mask[i].sum(-1) == mask[j].sum(-1)  # [examples]
            pair_mask = mask[i] & mask[j] & same[:, None]  # [examples, n_max]
            rho = spearman(scores[i], scores[j], pair_mask)  # [examples], NaN where undefined
            rho = rho[~rho.isnan()]
            matrix[i, j] = matrix[j, i] = float(rho.mean()) if rho.numel() else math.nan
    return methods, matrix


def agreement_figure(run: Run, *, dpi: int = DPI) -> Figure:
    """The :func:`agreement_matrix` as a heatmap: colours on [-1, 1], values printed, pairs
    without a value grey."""
    methods, matrix = agreement_matrix(run)
    m = len(methods)
    longest = max(len(x) for x in methods)
    side = 1.2 + 0.08 * longest + 0.75 * m
    fig = Figure(figsize=(max(side + 1.2, 4.5), max(side, 3.5)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps[COLORMAP].with_extremes(bad="lightgrey")  # NaN: no pair to compare
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="mean Spearman ρ over examples")
    ax.set_xticks(range(m), methods, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(m), methods)
    ax.tick_params(length=0)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, "—" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title("Agreement between methods")
    return fig


def metrics_figure(run: Run, *, dpi: int = DPI) -> Figure:
    """One bar chart per headline metric (plain metrics, and comprehensiveness / sufficiency
    as AOPC): a bar per method at its mean, error bars its 95% bootstrap interval. Methods
    without a value for a metric have no bar."""
    columns = headline_metrics(run)
    n_cols = min(4, max(len(columns), 1))
    n_rows = max(math.ceil(len(columns) / n_cols), 1)
    methods = list(run.methods)
    cells = {(r.method, r.metric, r.k): r for r in run.metrics}
    fig = Figure(
        figsize=(3.4 * n_cols, 0.6 + 3.0 * n_rows + 0.06 * max(len(x) for x in methods)),
        dpi=dpi,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    for ax, (metric, k, higher) in zip(axes, columns, strict=False):
        xs, means, below, above = [], [], [], []
        for x, method in enumerate(methods):
            r = cells.get((method, metric, k))
            if r is None or r.n == 0 or math.isnan(r.mean):
                continue
            xs.append(x)
            means.append(r.mean)
            # Clipped at 0: matplotlib refuses negative error lengths.
            below.append(max(r.mean - r.ci_low, 0.0))
            above.append(max(r.ci_high - r.mean, 0.0))
        colors = [f"C{x % 10}" for x in xs]
        ax.bar(xs, means, yerr=[below, above], color=colors, capsize=3)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{metric}{' (AOPC)' if k == 'aopc' else ''} {arrow(higher)}", fontsize=10)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    return fig


def arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"
