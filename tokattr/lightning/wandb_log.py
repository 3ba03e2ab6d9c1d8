"""Logging a finished benchmark run to Weights & Biases through Lightning's ``WandbLogger``.

Everything goes through the logger (``log_table``, ``log_image``, ``log_metrics``,
``log_hyperparams``), never ``run.log(..., step=...)`` behind its back (W&B drops such rows
with only a warning). Rank 0 only; offline unless asked (``WANDB_MODE`` is respected), with
the run's files under ``out_dir/wandb/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
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
    example_heatmap,
    mean_erasure_curves,
    metrics_figure,
)
from tokattr.table import CSV_COLUMNS

TOKEN_COLUMNS = ["example_id", "method", "position", "token", "label", "score"]
SUMMARY_COLUMNS = [c for c in CSV_COLUMNS if c != "n"]
"""The columns of ``metrics.csv`` but the example count."""


def make_logger(out_dir: str | Path, project: str = "tokattr", online: bool = False) -> WandbLogger:
    """A ``WandbLogger`` writing under ``out_dir`` (offline unless ``online``).

    Lightning (2.6) hands ``wandb.init`` an ``anonymous=None`` it was never given, and wandb
    0.31 warns that the setting is deprecated whenever it is passed at all; left out, it is the
    same default on every wandb release, and the user sees no deprecation warning."""
    logger = WandbLogger(project=project, save_dir=str(out_dir), offline=not online)
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


def log_run(
    logger: WandbLogger, run: Run, config: Mapping[str, Any], max_heatmaps: int = 12
) -> None:
    """Log a finished run: config, a summary table and headline metrics, per-token scores,
    per-example heatmaps (tokens x methods), deletion/insertion curves, the agreement matrix.
    """
    logger.log_hyperparams(dict(config))
    logger.log_table(
        key="metrics",
        columns=SUMMARY_COLUMNS,
        data=[[getattr(r, c) for c in SUMMARY_COLUMNS] for r in run.metrics],
    )
    headline = {
        f"{r.method}/{r.metric}": r.mean for r in run.metrics if r.k in ("", "aopc") and r.n > 0
    }
    logger.log_metrics(headline)
    tokens = []
    for row in run.rows:
        if not row.ok or row.scores is None:
            continue
        units = row.units or []
        labels = row.labels or [None] * len(units)
        for pos, (tok, lab, score) in enumerate(zip(units, labels, row.scores, strict=True)):
            tokens.append([row.example_id, row.method, pos, tok, lab, score])
    logger.log_table(key="token_scores", columns=TOKEN_COLUMNS, data=tokens)
    ids = run.example_ids[:max_heatmaps]
    logger.log_image(
        key="heatmaps",
        images=[_image(example_heatmap(run, e)) for e in ids],
        caption=[str(e) for e in ids],
    )
    figures = {"metrics_chart": metrics_figure(run)}
    if mean_erasure_curves(run):
        figures["erasure_curves"] = erasure_curves_figure(run)
        curves = mean_erasure_curves(run)
        logger.log_table(
            key="erasure_curves_table",
            columns=["method", "curve", "fraction", "value"],
            data=[
                [m, kind, float(x), float(y)]
                for m, c in curves.items()
                for kind, ys in (("deletion", c.deletion), ("insertion", c.insertion))
                for x, y in zip(c.x, ys, strict=True)
            ],
        )
    if len(run.methods) >= 2:
        figures["agreement"] = agreement_figure(run)
        methods, matrix = agreement_matrix(run)
        logger.log_table(
            key="agreement_table",
            columns=["method", *methods],
            data=[[m, *map(float, matrix[i])] for i, m in enumerate(methods)],
        )
    for key, fig in figures.items():
        logger.log_image(key=key, images=[_image(fig)])
    logger.experiment.finish()
