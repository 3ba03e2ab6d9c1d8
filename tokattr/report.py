"""Figures and a self-contained HTML report of a finished ``tokattr bench`` run.

Post-processing of the files in a run's ``out_dir`` (see :mod:`tokattr.results`): no model,
no Lightning, no W&B.

- :func:`load_run` reads ``attributions.jsonl`` and ``metrics.csv`` (and ``run.json`` /
  ``config.yaml`` when present) into a frozen :class:`Run`.
- :func:`example_heatmap` — one example's tokens x methods (the seed figure's layout);
  :func:`erasure_curves_figure` — mean normalised deletion / insertion curves (Petsiuk et al.,
  "RISE", 2018); :func:`agreement_figure` — mean Spearman rank correlation between methods;
  :func:`metrics_figure` — the headline metrics with their bootstrap intervals.
- :func:`write_report` writes the PNGs under ``out_dir/figures/`` and ``out_dir/report.html``,
  one file with every image embedded (data URIs), inline CSS and JS, no external URL, so it
  can be mailed or attached as it is.

Figures are drawn on a bare :class:`~matplotlib.figure.Figure` (Agg canvas), never through
pyplot, as in :mod:`tokattr.plots`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokattr.evaluation import EvaluationTable, MetricRow, format_value
from tokattr.metrics.ranking import spearman
from tokattr.plots import COLORBAR_LABEL, COLORMAP, plot_token_heatmap

CSV_COLUMNS = ("method", "metric", "k", "mean", "ci_low", "ci_high", "higher_is_better", "n")
HEADLINE_K = ("", "aopc")  # one number per metric: plain metrics, and the ERASER AOPC
GRID_POINTS = 21  # common x grid of the mean erasure curves: 0, 0.05, ..., 1
MIN_GAP = 1e-6  # |f(x) - f(baseline)| below this: the normalised curve is undefined
DPI = 110  # PNGs of the report: readable, and the HTML stays a few MB at most


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Run:
    """A finished benchmark run, as read from its ``out_dir``.

    ``rows`` are the rows of ``attributions.jsonl`` (one per (example, method), see
    :mod:`tokattr.lightning.runner`); ``metrics`` the rows of ``metrics.csv``; ``methods`` and
    ``example_ids`` in the order of the run; ``info`` the parsed ``run.json`` and
    ``config`` / ``config_text`` the ``config.yaml`` of the command, when present.
    """

    out_dir: Path
    rows: tuple[dict[str, Any], ...]
    metrics: tuple[MetricRow, ...]
    methods: tuple[str, ...]
    example_ids: tuple[str, ...]
    info: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    config_text: str | None = None
    _by_key: dict[tuple[str, str], dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.rows:
            key = (str(r["example_id"]), r["method"])
            if key in by_key:
                raise ValueError(f"{self.out_dir}: (example, method) {key} appears twice")
            by_key[key] = r
        object.__setattr__(self, "_by_key", by_key)  # frozen: the index is set once, here

    def row(self, example_id: str, method: str) -> dict[str, Any] | None:
        """The row of ``(example_id, method)``, or None."""
        return self._by_key.get((str(example_id), method))

    @property
    def table(self) -> EvaluationTable:
        """``metrics`` as an :class:`~tokattr.evaluation.EvaluationTable` (no per-example
        values: those stay in ``rows``), for its ``get`` and ``to_markdown``."""
        return EvaluationTable(rows=list(self.metrics), values={}, attributions={})

    def errors(self) -> list[dict[str, Any]]:
        """The rows of (example, method) pairs the method could not score."""
        return [r for r in self.rows if r.get("error")]


def load_run(out_dir: str | Path) -> Run:
    """Read a finished run's ``out_dir``.

    Raises:
        FileNotFoundError: no such folder, or ``attributions.jsonl`` / ``metrics.csv`` missing
            (a run that has not finished, or not been merged).
        ValueError: a malformed line or column, or a repeated (example, method) pair.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no such run folder: {out}")
    for name in ("attributions.jsonl", "metrics.csv"):
        if not (out / name).is_file():
            unfinished = any((out / "parts").glob("rank*.jsonl"))
            raise FileNotFoundError(
                f"{out / name}: no such file; {out} is not a finished `tokattr bench` run"
                + (
                    " (it has partial results: run the same command again to finish and merge)"
                    if unfinished
                    else ""
                )
            )
    rows = _read_rows(out / "attributions.jsonl")
    metrics = _read_metrics(out / "metrics.csv")
    methods = dict.fromkeys(r["method"] for r in rows)
    methods.update(dict.fromkeys(m.method for m in metrics))  # a method with no rows left
    config_file, info_file = out / "config.yaml", out / "run.json"
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    return Run(
        out_dir=out,
        rows=tuple(rows),
        metrics=tuple(metrics),
        methods=tuple(methods),
        example_ids=tuple(dict.fromkeys(str(r["example_id"]) for r in rows)),
        info=json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else None,
        config=yaml.safe_load(config_text) if config_text is not None else None,
        config_text=config_text,
    )


def _read_rows(path: Path) -> list[dict[str, Any]]:
    # The merged file is written whole and renamed into place, so a bad line is an error here
    # (unlike the part files, where a killed run may leave one).
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _read_metrics(path: Path) -> list[MetricRow]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
        return [
            MetricRow(
                method=r["method"],
                metric=r["metric"],
                k=r["k"],
                mean=float(r["mean"]),  # "nan" where no example has a value
                ci_low=float(r["ci_low"]),
                ci_high=float(r["ci_high"]),
                higher_is_better=r["higher_is_better"] == "True",
                n=int(r["n"]),
            )
            for r in reader
        ]


# --------------------------------------------------------------------------- heatmap


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
    rows = [r for m in run.methods if (r := run.row(example_id, m)) and r.get("scores")]
    if not rows:
        raise ValueError(f"example {example_id!r}: no method scored it")
    tokens = rows[0]["tokens"]
    for r in rows[1:]:
        if r["tokens"] != tokens:
            raise ValueError(
                f"example {example_id!r}: {r['method']} has tokens {r['tokens']}, "
                f"{rows[0]['method']} has {tokens}"
            )
    raw = np.array([r["scores"] for r in rows], dtype=float).T  # [tokens, methods]
    if not np.isfinite(raw).all():
        raise ValueError(f"example {example_id!r}: non-finite scores")
    return list(tokens), [r["method"] for r in rows], raw


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
        f"{example_id}: {_short(row['prompt'])} → {_short(row.get('answer') or '')}\n"
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


# --------------------------------------------------------------------------- erasure curves


class MeanCurves(NamedTuple):
    """One method's normalised erasure curves, averaged over examples on a common grid."""

    x: np.ndarray  # [points] fraction of tokens removed / inserted, 0..1
    deletion: np.ndarray  # [points] starts at 1 (f(x)), ends at 0 (f(baseline))
    insertion: np.ndarray  # [points] starts at 0, ends at 1
    n: int  # examples averaged


def normalise_curve(curve: Sequence[float], f_x: float, f_base: float, x: np.ndarray) -> np.ndarray:
    """``(f - f(baseline)) / (f(x) - f(baseline))`` of a curve of ``n + 1`` values drawn at
    ``i / n``, linearly interpolated at ``x``. ``[n + 1] -> [len(x)]``"""
    f = np.asarray(curve, dtype=float)  # [n + 1]
    steps = np.linspace(0.0, 1.0, len(f))  # [n + 1]
    return np.interp(x, steps, (f - f_base) / (f_x - f_base))


def mean_erasure_curves(run: Run, points: int = GRID_POINTS) -> dict[str, MeanCurves]:
    """Per method, the mean normalised deletion and insertion curves (Petsiuk et al. 2018),
    with f(x) = ``deletion[0]`` and f(baseline) = ``deletion[-1]`` of each example.

    Examples without curves, with non-finite values, or with ``|f(x) - f(baseline)| < 1e-6``
    (removing every token changes nothing: no scale to normalise by) are skipped; methods
    left with no example are absent.
    """
    x = np.linspace(0.0, 1.0, points)  # [points]
    out: dict[str, MeanCurves] = {}
    for method in run.methods:
        deletion, insertion = [], []
        for e in run.example_ids:
            curves = (run.row(e, method) or {}).get("curves")
            if not curves or len(curves.get("deletion") or []) < 2:
                continue
            d, i = curves["deletion"], curves.get("insertion") or []
            if len(i) < 2 or any(v is None or not math.isfinite(v) for v in [*d, *i]):
                continue
            f_x, f_base = d[0], d[-1]
            if abs(f_x - f_base) < MIN_GAP:
                continue
            deletion.append(normalise_curve(d, f_x, f_base, x))
            insertion.append(normalise_curve(i, f_x, f_base, x))
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


# --------------------------------------------------------------------------- agreement


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
    lengths = [len(r["scores"]) for r in run.rows if r.get("scores")]
    n_max = max(lengths, default=1)
    scores = torch.zeros(len(methods), len(ids), n_max, dtype=torch.float64)
    mask = torch.zeros(len(methods), len(ids), n_max, dtype=torch.bool)
    for i, m in enumerate(methods):
        for b, e in enumerate(ids):
            s = (run.row(e, m) or {}).get("scores")
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


# --------------------------------------------------------------------------- metrics


def headline_metrics(run: Run) -> list[tuple[str, str, bool]]:
    """The table's columns: ``(metric, k, higher_is_better)`` with ``k`` ``""`` or ``"aopc"``,
    in the order of ``metrics.csv``."""
    return list(
        dict.fromkeys((r.metric, r.k, r.higher_is_better) for r in run.metrics if r.k in HEADLINE_K)
    )


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
        ax.set_title(f"{metric}{' (AOPC)' if k == 'aopc' else ''} {_arrow(higher)}", fontsize=10)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    return fig


def _arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


# --------------------------------------------------------------------------- cost


class Cost(NamedTuple):
    """A method's own cost over the run (the metrics' model calls are not counted)."""

    method: str
    examples: int  # scored
    errors: int
    time_s: float  # total attribution time
    ms_per_example: float
    evals_per_example: float  # model evaluations


def method_costs(run: Run) -> list[Cost]:
    """Per method, from the rows: examples scored, errors, time and model evaluations."""
    out = []
    for m in run.methods:
        mine = [r for r in run.rows if r["method"] == m]
        scored = [r for r in mine if not r.get("error")]
        n = max(len(scored), 1)
        total_ms = sum(float(r.get("time_ms") or 0) for r in scored)
        evals = sum(float(r.get("model_evals") or 0) for r in scored)
        out.append(
            Cost(m, len(scored), len(mine) - len(scored), total_ms / 1000, total_ms / n, evals / n)
        )
    return out


# --------------------------------------------------------------------------- the report


def write_report(out_dir: str | Path, max_examples: int = 12) -> Path:
    """Write the figures and ``report.html`` of a finished run.

    PNGs under ``out_dir/figures/``: ``heatmap_<example_id>.png`` for the first
    ``max_examples`` examples, ``erasure_curves.png`` (when the run has curves),
    ``agreement.png`` (with two methods or more) and ``metrics.png``. ``report.html`` embeds
    them (base64 data URIs) with inline CSS and JS: it refers to no other file and no URL.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: ``out_dir`` is not a finished run (see :func:`load_run`).
    """
    run = load_run(out_dir)
    figures = run.out_dir / "figures"
    figures.mkdir(exist_ok=True)
    parts = [_summary_html(run), _metrics_html(run)]
    if headline_metrics(run):
        parts.append(_figure_html(metrics_figure(run), figures / "metrics.png", "metrics"))
    parts.append(_cost_html(run))

    parts.append("<h2>Deletion and insertion curves</h2>")
    if mean_erasure_curves(run):
        parts.append(
            "<p>f is the target score (e.g. the log-probability of the answer); each "
            "example's curve is normalised to 1 at the full prompt and 0 with every token "
            "removed, then averaged over examples.</p>"
        )
        fig = erasure_curves_figure(run)
        parts.append(_figure_html(fig, figures / "erasure_curves.png", "erasure curves"))
    else:
        parts.append("<p>This run has no deletion / insertion curves.</p>")

    if len(run.methods) >= 2:
        parts.append("<h2>Agreement between methods</h2>")
        fig = agreement_figure(run)
        parts.append(_figure_html(fig, figures / "agreement.png", "agreement between methods"))

    parts.append(_heatmaps_html(run, figures, max_examples))
    parts.append(_errors_html(run))
    path = run.out_dir / "report.html"
    path.write_text(_page(f"tokattr report: {run.out_dir.name}", "\n".join(parts)), "utf-8")
    return path


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure_html(fig: Figure, path: Path, alt: str) -> str:
    """Save ``fig`` as PNG at ``path`` and return an ``<img>`` with the PNG inlined."""
    fig.savefig(path, dpi=fig.dpi)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _summary_html(run: Run) -> str:
    info = dict(run.info or {})
    examples = info.pop("examples", None)  # every prompt: too long for a summary
    facts: dict[str, object] = {
        "folder": str(run.out_dir),
        "examples": len(run.example_ids),
        "methods": ", ".join(run.methods),
    }
    if examples is not None and len(examples) != len(run.example_ids):
        facts["examples in run.json"] = len(examples)  # should not happen in a merged run
    facts.update({k: _plain(v) for k, v in info.items()})
    trainer = (run.config or {}).get("trainer") or {}
    for key in ("accelerator", "devices", "strategy", "precision", "num_nodes"):
        if key in trainer:
            facts[f"trainer.{key}"] = _plain(trainer[key])
    data = (run.config or {}).get("data") or {}
    for key, value in data.items():
        facts[f"data.{key}"] = _plain(value)
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts.items())
    out = [
        f"<h1>tokattr benchmark report: {_esc(run.out_dir.name)}</h1>",
        "<h2>Run</h2>",
        f'<table class="facts" id="run">\n<tbody>\n{rows}\n</tbody>\n</table>',
    ]
    if run.config_text is not None:
        out.append(
            f"<details><summary>config.yaml</summary><pre>{_esc(run.config_text)}</pre></details>"
        )
    return "\n".join(out)


def _plain(value: object) -> str:
    """A config value as one line of text (JSON for lists and mappings)."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _metrics_html(run: Run) -> str:
    out = [
        "<h2>Metrics</h2>",
        _metric_table(run, headline_metrics(run), "metrics"),
        "<p>↑ higher is better, ↓ lower is better. Each cell: mean over examples "
        "[95% bootstrap interval]; comprehensiveness and sufficiency are AOPC (their mean over "
        "the token fractions k); — : the metric does not apply or has no value. Click a "
        "column header to sort.</p>",
    ]
    per_k = list(
        dict.fromkeys(
            (r.metric, r.k, r.higher_is_better) for r in run.metrics if r.k not in HEADLINE_K
        )
    )
    if per_k:
        out.append(
            "<details><summary>comprehensiveness and sufficiency at each k</summary>"
            + _metric_table(run, per_k, "metrics-per-k")
            + "</details>"
        )
    return "\n".join(out)


def _metric_table(run: Run, columns: list[tuple[str, str, bool]], table_id: str) -> str:
    cells = {(r.method, r.metric, r.k): r for r in run.metrics}
    head = ['<th class="sortable" title="click to sort">method</th>']
    for metric, k, higher in columns:
        name = metric + ("" if k in HEADLINE_K else f"@{k}")
        direction = "higher" if higher else "lower"
        head.append(
            f'<th class="sortable" title="{direction} is better; click to sort">'
            f"{_esc(name)} {_arrow(higher)}</th>"
        )
    body = []
    for method in run.methods:
        tds = [f'<td data-sort="{_esc(method)}">{_esc(method)}</td>']
        for metric, k, _ in columns:
            r = cells.get((method, metric, k))
            if r is None or r.n == 0 or math.isnan(r.mean):
                tds.append('<td data-sort="">—</td>')
            else:
                tds.append(
                    f'<td data-sort="{r.mean!r}" title="n = {r.n}">'
                    f"{format_value(r.mean)} [{format_value(r.ci_low)}, "
                    f"{format_value(r.ci_high)}]</td>"
                )
        body.append("<tr>" + "".join(tds) + "</tr>")
    return _table(table_id, head, body)


def _table(table_id: str, head: list[str], body: list[str]) -> str:
    return (
        f'<table class="sortable" id="{table_id}">\n<thead><tr>{"".join(head)}</tr></thead>\n'
        "<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"
    )


def _cost_html(run: Run) -> str:
    titles = [
        "method",
        "examples",
        "errors",
        "time (s)",
        "ms / example",
        "model evals / example",
    ]
    head = [f'<th class="sortable" title="click to sort">{t}</th>' for t in titles]
    body = []
    for c in method_costs(run):
        shown = [
            c.method,
            str(c.examples),
            str(c.errors),
            f"{c.time_s:.2f}",
            f"{c.ms_per_example:.1f}",
            f"{c.evals_per_example:.0f}",
        ]
        keys = [c.method, c.examples, c.errors, c.time_s, c.ms_per_example, c.evals_per_example]
        body.append(
            "<tr>"
            + "".join(
                f'<td data-sort="{_esc(k)}">{_esc(s)}</td>'
                for k, s in zip(keys, shown, strict=True)
            )
            + "</tr>"
        )
    return (
        "<h2>Cost</h2>\n"
        + _table("cost", head, body)
        + "\n<p>The method's own attribution time and model evaluations per scored example "
        "(the metrics' model calls are not counted).</p>"
    )


def _heatmaps_html(run: Run, figures: Path, max_examples: int) -> str:
    shown = list(run.example_ids[: max(max_examples, 0)])
    out = [
        "<h2>Attributions per example</h2>",
        f"<p>The first {len(shown)} of {len(run.example_ids)} examples. Colours: each "
        "method's scores divided by its largest |score| (methods differ in scale by orders of "
        "magnitude); numbers: the raw scores.</p>",
    ]
    for e in shown:
        first = next((r for m in run.methods if (r := run.row(e, m))), None)
        assert first is not None
        out.append(
            f"<h3>{_esc(e)}</h3>\n<p>prompt <code>{_esc(first['prompt'])}</code>, answer "
            f"<code>{_esc(first.get('answer') or '')}</code></p>"
        )
        try:
            fig = example_heatmap(run, e)
        except ValueError as err:  # every method failed on it, or scores not finite
            out.append(f"<p>not drawn: {_esc(err)}</p>")
            continue
        out.append(_figure_html(fig, figures / f"heatmap_{_file_name(e)}.png", f"heatmap {e}"))
    return "\n".join(out)


def _file_name(example_id: str) -> str:
    # Example ids come from the user's JSONL: keep them out of other folders.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", example_id)


def _errors_html(run: Run) -> str:
    errors = run.errors()
    if not errors:
        return "<h2>Errors</h2>\n<p>None: every method scored every example.</p>"
    head = [
        f'<th class="sortable" title="click to sort">{t}</th>'
        for t in ("example", "method", "prompt", "error")
    ]
    body = [
        "<tr>"
        + "".join(
            f"<td>{_esc(v)}</td>" for v in (r["example_id"], r["method"], r["prompt"], r["error"])
        )
        + "</tr>"
        for r in errors
    ]
    return f"<h2>Errors ({len(errors)})</h2>\n" + _table("errors", head, body)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td[data-sort] { font-variant-numeric: tabular-nums; }
thead th { background: #f2f2f2; }
th.sortable { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " ▲"; }
th[aria-sort="descending"]::after { content: " ▼"; }
table.facts th { background: #f8f8f8; font-weight: normal; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""

# Click a header to sort its table by that column: numbers (data-sort) numerically, text
# alphabetically, empty cells last; a second click reverses.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      function key(tr) {
        var td = tr.cells[col], v = td.getAttribute("data-sort");
        if (v === null) { v = td.textContent; }
        var x = Number(v);
        return v === "" ? null : (isNaN(x) ? v : x);
      }
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
        var c = x < y ? -1 : (x > y ? 1 : 0);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body>\n</html>\n"
    )


__all__ = [
    "Cost",
    "MeanCurves",
    "Run",
    "agreement_figure",
    "agreement_matrix",
    "erasure_curves_figure",
    "example_heatmap",
    "example_scores",
    "format_score",
    "headline_metrics",
    "load_run",
    "mean_erasure_curves",
    "method_costs",
    "metrics_figure",
    "normalise_curve",
    "write_report",
]
