"""Token x column heatmaps drawn: the figure and the CSV of a ``[tokens, columns]`` matrix.

The figure that started the project: one query's tokens as rows, one column per
demonstration placed before the query (or per method, or per model), each cell the token's
attribution printed to four decimals on a red-yellow-green colour map centred on 0.

:func:`plot_token_heatmap` and :func:`write_heatmap_csv` take a plain matrix; computing one
from a model is :mod:`tokattr.heatmaps`, so drawing (here, and the report's figures) imports
no model code. Figures are drawn on a bare :class:`~matplotlib.figure.Figure` (Agg canvas),
never through pyplot, so nothing here opens a window or keeps figures alive in pyplot's
registry.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

COLORMAP = "RdYlGn"  # red negative, pale yellow 0, green positive (the seed figure)
COLORBAR_LABEL = "Token Attribution"


def plot_token_heatmap(
    matrix: Tensor | np.ndarray,
    tokens: Sequence[str],
    columns: Sequence[str],
    title: str | None = None,
    path: str | Path | None = None,
    *,
    colorbar_label: str = COLORBAR_LABEL,
    decimals: int = 4,
    dpi: int = 150,
) -> Figure:
    """Draw a ``[tokens, columns]`` matrix as the project's token heatmap.

    Rows are ``tokens``, columns ``columns``; every cell shows its value to ``decimals``
    places; colours run red (negative) - pale yellow (0) - green (positive) on a colour bar
    symmetric about 0 (``vmin = -vmax``, ``vmax`` the largest magnitude). The figure's size
    grows with the number and length of the rows and columns, so the text stays readable.

    Args:
        matrix: ``[len(tokens), len(columns)]`` finite scores.
        path: also save the figure there (PNG at ``dpi``; the image is exactly
            ``figure size x dpi`` pixels).

    Returns:
        The figure (Agg canvas): ``fig.axes[0]`` the heatmap, ``fig.axes[1]`` the colour bar.
    """
    values = _as_array(matrix, tokens, columns)  # [tokens, columns]
    # An all-zero matrix still needs a non-degenerate colour scale.
    vmax = float(np.abs(values).max()) or 1.0

    fig = Figure(figsize=_figure_size(tokens, columns), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap=COLORMAP, vmin=-vmax, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    _label_axes(ax, tokens, columns)
    _write_cells(ax, values, image.norm, image.cmap, decimals)
    if title:
        ax.set_title(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


CELL_WIDTH, CELL_HEIGHT = 0.95, 0.36  # inches: room for '-0.0000' at 9 pt, one text line
CHAR = 0.085  # inches per character of a 10 pt tick label (rough, DejaVu Sans)


def _figure_size(tokens: Sequence[str], columns: Sequence[str]) -> tuple[float, float]:
    # Margins grow with the longest labels (column labels are rotated 30 degrees, so they
    # take half their length in height) so that constrained layout never runs out of room.
    longest_token = max(len(t) for t in tokens)
    longest_column = max(len(c) for c in columns)
    width = 0.6 + CHAR * longest_token + CELL_WIDTH * len(columns) + 1.3
    width = max(width, 0.87 * CHAR * longest_column + 1.8)
    height = 0.7 + CELL_HEIGHT * len(tokens) + 0.35 + 0.5 * CHAR * longest_column
    return max(width, 4.0), max(height, 3.0)


def _label_axes(ax, tokens: Sequence[str], columns: Sequence[str]) -> None:
    ax.set_yticks(range(len(tokens)), list(tokens))
    ax.set_xticks(
        range(len(columns)), list(columns), rotation=30, ha="right", rotation_mode="anchor"
    )
    ax.tick_params(length=0)
    # Thin white lines between cells, as in the seed figure.
    ax.set_xticks(np.arange(len(columns) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(tokens) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _write_cells(ax, values: np.ndarray, norm: Normalize, cmap, decimals: int) -> None:
    for (i, j), v in np.ndenumerate(values):
        r, g, b, _ = cmap(norm(v))
        # White text on the dark ends of the map, black elsewhere (relative luminance).
        color = "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.45 else "black"
        ax.text(j, i, f"{v:.{decimals}f}", ha="center", va="center", fontsize=9, color=color)


def write_heatmap_csv(
    path: str | Path, matrix: Tensor | np.ndarray, tokens: Sequence[str], labels: Sequence[str]
) -> Path:
    """Write the ``[tokens, columns]`` matrix as CSV: a ``token`` column, one per label.

    Values are written at full precision (``repr`` of the float: a float32 reads back exactly).
    """
    values = _as_array(matrix, tokens, labels)  # [tokens, columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["token", *labels])
        for token, row in zip(tokens, values, strict=True):
            writer.writerow([token, *(repr(float(v)) for v in row)])
    return path


def _as_array(
    matrix: Tensor | np.ndarray, tokens: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    values = np.asarray(
        matrix.detach().cpu().float() if isinstance(matrix, Tensor) else matrix, dtype=float
    )  # [tokens, columns] float64
    if values.shape != (len(tokens), len(labels)):
        raise ValueError(
            f"matrix of shape {values.shape} for {len(tokens)} tokens x {len(labels)} columns"
        )
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("the matrix must be non-empty and finite")
    return values
