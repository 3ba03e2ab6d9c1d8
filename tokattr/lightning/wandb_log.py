"""Logging a benchmark run to Weights & Biases through Lightning's ``WandbLogger``: the
logger is made before the first batch (:func:`make_logger`, live numbers from
:class:`~tokattr.lightning.live.LiveProgress`), the charts and tables of the finished run at
the end (:func:`log_run`).

Everything goes through the logger (``log_table``, ``log_image``, ``log_metrics``,
``log_hyperparams``), never ``run.log(..., step=...)`` behind its back (W&B drops such rows
with only a warning). Rank 0 only; offline unless asked (``WANDB_MODE`` is respected), with
the run's files under ``out_dir/wandb/``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokattr.report import (
    Run,
    agreement_figure,
    agreement_matrix,
    erasure_curves_figure,
    mean_erasure_curves,
    metrics_figure,
)
from tokattr.results import method_costs
from tokattr.sanity import SANITY_COLUMNS
from tokattr.table import CSV_COLUMNS

TOKEN_COLUMNS = ["example_id", "method", "position", "token", "label", "score"]
SUMMARY_COLUMNS = [c for c in CSV_COLUMNS if c != "n"]
"""The columns of ``metrics.csv`` but the example count."""
CHECK_COLUMNS = (
    "metric",
    "methods",
    "discriminated",
    "resolution",
    "rank_agreement",
    "verdict",
    "flagged",
)
"""The columns of the ``metric_checks`` table: one row per metric (:mod:`tokattr.sanity`)."""


RUN_ID_FILE = "run_id"
"""``out_dir/wandb/run_id``: the W&B run of this ``out_dir``, continued by a resumed run."""


def wandb_dirs(out_dir: str | Path) -> Path:
    """Point W&B's folders at ``out_dir/wandb`` (``WANDB_DIR``, and ``WANDB_DATA_DIR``, where
    tables and other media are staged before upload) so that ``wandb sync
    out_dir/wandb/offline-run-*`` from another machine finds everything. Process-wide: W&B
    reads them when it stages a file, not only at ``wandb.init``."""
    folder = Path(out_dir) / "wandb"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(Path(out_dir).resolve())
    os.environ["WANDB_DATA_DIR"] = str((folder / "data").resolve())
    return folder


def make_logger(
    out_dir: str | Path,
    project: str = "tokattr",
    online: bool = False,
    *,
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    new_run: bool = False,
) -> WandbLogger:
    """A ``WandbLogger`` writing under ``out_dir`` (offline unless ``online``) that continues
    the W&B run of an earlier, interrupted run of the same ``out_dir`` (its id is kept in
    ``out_dir/wandb/run_id``), unless ``new_run``.

    Lightning (2.6) hands ``wandb.init`` an ``anonymous=None`` it was never given, and wandb
    0.31 warns that the setting is deprecated whenever it is passed at all; left out, it is the
    same default on every wandb release, and the user sees no deprecation warning."""
    from wandb.sdk.lib.runid import generate_id

    folder = wandb_dirs(out_dir)
    id_file = folder / RUN_ID_FILE
    if new_run or not id_file.is_file():
        id_file.write_text(generate_id() + "\n")
    run_id = id_file.read_text().strip()
    logger = WandbLogger(
        project=project,
        entity=entity,
        group=group,
        tags=list(tags) if tags else None,
        save_dir=str(out_dir),
        offline=not online,
        id=run_id,
        resume="allow",
    )
    init = getattr(logger, "_wandb_init", {})
    if "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


def _image(fig: Figure) -> Any:
    from PIL import Image

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@dataclass
class LoggedRun:
    """What :func:`log_run` logged: the run's keys (a chart's data under ``<key>_table``) and,
    per chart key, its W&B chart preset, table, fields and strings."""

    keys: list[str] = field(default_factory=list)
    charts: dict[str, dict[str, Any]] = field(default_factory=dict)


def log_run(
    logger: WandbLogger,
    run: Run,
    config: Mapping[str, Any] | None = None,
    max_heatmaps: int = 12,
    finish: bool = True,
) -> LoggedRun:
    """Log a finished run: the summary table, the metric checks (``metric_sanity`` and
    ``metric_checks``), headline metrics and a bar chart per headline metric; per-token
    scores; a table of examples with one token heatmap image (all of one size) per example
    and method; the deletion / insertion curves as line series; the
    agreement matrix; the cost per method; the matplotlib figures of ``report.html``.
    Returns what was logged.
    """
    import wandb

    if config is not None:
        logger.log_hyperparams(dict(config))
    logged = LoggedRun()

    def log(values: dict[str, Any]) -> None:
        logger.log_metrics(values)
        for key, value in values.items():
            spec = getattr(value, "spec", None)
            if spec is not None and getattr(spec, "spec_name", None):
                # W&B keeps a chart's data as the table "<key>_table" and the chart itself
                # as a panel spec of the run.
                logged.charts[key] = {"spec_name": spec.spec_name, "table": f"{key}_table",
                                      "fields": dict(spec.fields),
                                      "strings": dict(spec.string_fields)}  # fmt: skip
                logged.keys.append(f"{key}_table")
            else:
                logged.keys.append(key)

    summary = [[getattr(r, c) for c in SUMMARY_COLUMNS] for r in run.metrics]
    log({"metrics": wandb.Table(columns=SUMMARY_COLUMNS, data=summary)})
    if run.sanity:  # the metric checks (tokattr.sanity): per method, then per metric
        sanity = [[getattr(s, c) for c in SANITY_COLUMNS] for s in run.sanity]
        log({"metric_sanity": wandb.Table(columns=list(SANITY_COLUMNS), data=sanity)})
        log({"metric_checks": wandb.Table(
            columns=list(CHECK_COLUMNS),
            data=[[getattr(c, k) for k in CHECK_COLUMNS] for c in run.checks],
        )})  # fmt: skip
    headline = [r for r in run.metrics if r.k in ("", "aopc") and r.n > 0]
    log({f"{r.method}/{r.metric}": r.mean for r in headline})
    charts = {}
    for metric in dict.fromkeys(r.metric for r in headline):
        rows = [r for r in headline if r.metric == metric]
        arrow = "higher" if rows[0].higher_is_better else "lower"
        table = wandb.Table(
            columns=["method", "mean", "ci_low", "ci_high"],
            data=[[r.method, r.mean, r.ci_low, r.ci_high] for r in rows],
        )
        charts[f"charts/{metric}"] = wandb.plot.bar(
            table, "method", "mean", title=f"{metric} ({arrow} is better)"
        )
    log(charts)
    tokens = []
    for row in run.rows:
        if not row.ok or row.scores is None:
            continue
        units = row.units or []
        labels = row.labels or [None] * len(units)
        flat = row.scores if not row.scores or not isinstance(row.scores[0], list) else None
        if flat is None:
            continue
        for pos, (tok, lab, score) in enumerate(zip(units, labels, flat, strict=True)):
            tokens.append([row.example_id, row.method, pos, tok, lab, score])
    log({"token_scores": wandb.Table(columns=TOKEN_COLUMNS, data=tokens)})
    log({"heatmaps": _examples_table(run, max_heatmaps)})
    costs = method_costs(list(run.rows), list(run.methods))
    cost_table = wandb.Table(
        columns=["method", "examples", "errors", "time_s", "ms_per_example", "evals_per_example"],
        data=[
            [c.method, c.examples, c.errors, c.time_s, c.ms_per_example, c.evals_per_example]
            for c in costs
        ],
    )
    log({"cost": cost_table})
    log({"charts/cost_ms_per_example": wandb.plot.bar(
        cost_table, "method", "ms_per_example", title="ms per example (method time)"
    )})  # fmt: skip
    figures = {"metrics_chart": metrics_figure(run)}
    curves = mean_erasure_curves(run)
    if curves:
        figures["erasure_curves"] = erasure_curves_figure(run)
        log({"erasure_curves_table": wandb.Table(
            columns=["method", "curve", "fraction", "value"],
            data=[
                [m, kind, float(x), float(y)]
                for m, c in curves.items()
                for kind, ys in (("deletion", c.deletion), ("insertion", c.insertion))
                for x, y in zip(c.x, ys, strict=True)
            ],
        )})  # fmt: skip
        methods = list(curves)
        for kind in ("deletion", "insertion"):
            log({f"charts/{kind}_curve": wandb.plot.line_series(
                xs=[float(x) for x in curves[methods[0]].x],
                ys=[[float(y) for y in getattr(curves[m], kind)] for m in methods],
                keys=methods,
                title=f"mean normalised {kind} curve",
                xname="fraction of features",
            )})  # fmt: skip
    if len(run.methods) >= 2:
        figures["agreement"] = agreement_figure(run)
        methods, matrix = agreement_matrix(run)
        log({"agreement_table": wandb.Table(
            columns=["method", *methods],
            data=[[m, *map(float, matrix[i])] for i, m in enumerate(methods)],
        )})  # fmt: skip
        # W&B's matrix heatmap preset (the one its confusion matrices use), on the long form.
        pairs = wandb.Table(
            columns=["method", "versus", "spearman"],
            data=[[a, b, float(matrix[i][j])] for i, a in enumerate(methods)
                  for j, b in enumerate(methods)],
        )  # fmt: skip
        log({"charts/agreement": wandb.plot.plot_table(
            "wandb/confusion_matrix/v1", pairs,
            {"Actual": "method", "Predicted": "versus", "nPredictions": "spearman"},
            {"title": "method agreement (mean Spearman rho of the scores)"},
        )})  # fmt: skip
    for key, fig in figures.items():
        # One image per key: W&B shows the images of one key in a grid of one size.
        logger.log_image(key=key, images=[_image(fig)])
        logged.keys.append(key)
    logger.save()
    if finish:
        logger.experiment.finish()
    return logged


HEATMAP_SIZE = (800, 140)
"""Pixel size of every per-example heatmap image: W&B shows a table's images at one size."""


def token_heatmap_image(tokens: Sequence[str], scores: Sequence[float], title: str = "") -> Any:
    """One row of tokens shaded by score (red positive, blue negative, symmetric around zero),
    at :data:`HEATMAP_SIZE` whatever the number of tokens (labels thinned past 60)."""
    import numpy as np
    import wandb

    w, h = HEATMAP_SIZE
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0.01, 0.45, 0.98, 0.38))
    values = np.asarray([float(s) for s in scores], dtype=float)[None, :]
    top = float(np.nanmax(np.abs(values))) if values.size else 0.0
    ax.imshow(values, cmap="RdBu_r", vmin=-(top or 1.0), vmax=top or 1.0, aspect="auto")
    n = len(tokens)
    every = max(1, -(-n // 60))
    ticks = list(range(0, n, every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(tokens[i]).replace("\u2581", "␣") for i in ticks],
                       fontsize=7 if n <= 30 else 5, rotation=0 if n <= 20 else 90)  # fmt: skip
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, loc="left")
    return wandb.Image(_image(fig))


def _examples_table(run: Run, max_examples: int) -> Any:
    """One row per (example, method) of the first ``max_examples`` examples: the data set's
    bucket, the answer, the top feature and its label, and the token heatmap (an image of one
    size for every row)."""
    import wandb

    table = wandb.Table(
        columns=["example_id", "bucket", "method", "answer", "top_feature", "top_label",
                 "heatmap"]
    )  # fmt: skip
    for e in run.example_ids[:max_examples]:
        for m in run.methods:
            row = run.row(e, m)
            if row is None or not row.ok or not row.scores or isinstance(row.scores[0], list):
                continue
            units = list(row.units or [])
            scores = [float(s) for s in row.scores]  # type: ignore[arg-type]
            top = max(range(len(scores)), key=lambda i: abs(scores[i]))
            label = (row.labels or [None] * len(units))[top] if not row.features else None
            table.add_data(
                e, row.bucket, m, row.answer, units[top], label,
                token_heatmap_image(units, scores, f"{e} · {m}"),
            )  # fmt: skip
    return table
