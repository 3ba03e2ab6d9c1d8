"""Token x column heatmaps: the matrix (one attribution per column) and its figure.

The figure that started the project: one query's tokens as rows, one column per
demonstration placed before the query (or per method, or per model), each cell the token's
attribution printed to four decimals on a red-yellow-green colour map centred on 0.

Only :func:`heatmap_matrix` touches a model; :func:`plot_token_heatmap` and
:func:`write_heatmap_csv` take a plain ``[tokens, columns]`` matrix. Figures are drawn on a
bare :class:`~matplotlib.figure.Figure` (Agg canvas), never through pyplot, so nothing here
opens a window or keeps figures alive in pyplot's registry.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from tokattr.accuracy import greedy_answers
from tokattr.attribution import Attribution, attribute, method_parameters
from tokattr.batching import encode_example
from tokattr.data.arithmetic import SEPARATOR, with_demonstrations
from tokattr.models import LanguageModel

COLORMAP = "RdYlGn"  # red negative, pale yellow 0, green positive (the seed figure)
COLORBAR_LABEL = "Token Attribution"
Span = tuple[int, int]  # a token's characters [start, end) in the text it came from


class Heatmap(NamedTuple):
    """What a heatmap shows: ``matrix[i, j]`` is ``tokens[i]``'s score in column ``labels[j]``."""

    tokens: list[str]  # the query's tokens (see heatmap_matrix for their spelling)
    labels: list[str]  # one per column
    matrix: Tensor  # [len(tokens), len(labels)] float32 CPU


class Column(NamedTuple):
    """One column to compute: its label, the full prompt, the method and its parameters."""

    label: str
    prompt: str
    method: str
    params: dict[str, object]


# --------------------------------------------------------------------------- the matrix


def plan_columns(
    query: str,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    method: str = "integrated_gradients",
    method_params: Mapping[str, object] | None = None,
) -> list[Column]:
    """Check a heatmap's layout and spell out its columns, without touching a model.

    Exactly one of ``columns`` (demonstrations placed before the query, one column each; a
    column may hold several, joined by ``;``) and ``methods`` (the bare query, one column per
    method) is given. ``method_params`` go to every method that takes them.

    Raises:
        ValueError: an empty query; both or neither of ``columns`` / ``methods``; an empty,
            empty-part or repeated column; an unknown method; a parameter no method takes.
    """
    if not isinstance(query, str) or not query:
        raise ValueError(f"empty query: {query!r}; give the prompt to attribute, e.g. '7x5='")
    if columns is not None and methods is not None:
        raise ValueError("give either columns (demonstrations) or methods as columns, not both")
    if not columns and not methods:
        raise ValueError("no columns: give demonstrations (--columns) or methods (--methods)")
    labels = list(columns if columns is not None else methods)
    repeated = sorted({c for c in labels if labels.count(c) > 1})
    if repeated:
        raise ValueError(f"repeated column(s) {repeated}: every column needs its own label")

    names = [method] * len(labels) if columns is not None else labels
    params = dict(method_params or {})
    accepted = {m: method_parameters(m) for m in names}  # raises on an unknown method
    unused = sorted(k for k in params if not any(k in a for a in accepted.values()))
    if unused:
        raise ValueError(
            f"parameter(s) {unused} are taken by none of the methods {sorted(set(names))}"
        )

    plan = []
    for label, name in zip(labels, names, strict=True):
        prompt = query if columns is None else _prompt_with(label, query)
        mine = {k: v for k, v in params.items() if k in accepted[name]}
        plan.append(Column(label, prompt, name, mine))
    return plan


def _prompt_with(column: str, query: str) -> str:
    # A column may carry several demonstrations; each part must be a real one, since an empty
    # part would put a bare ';' in front of the query, which the data set never does.
    parts = column.split(SEPARATOR)
    if not all(p.strip() for p in parts):
        raise ValueError(f"empty demonstration in column {column!r}")
    return with_demonstrations(parts, query)


def default_target(lm: LanguageModel, query: str) -> str:
    """The model's greedy answer to the bare query: the answer every column attributes."""
    (answer,) = greedy_answers(lm, [query])
    if not answer:
        raise ValueError(f"the model's greedy answer to {query!r} is empty; give a target")
    return answer


def heatmap_matrix(
    lm: LanguageModel,
    query: str,
    columns: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    method: str = "integrated_gradients",
    target: str | None = None,
    baseline: str = "pad",
    seed: int | None = 0,
    batch_size: int | None = None,
    method_params: Mapping[str, object] | None = None,
) -> Heatmap:
    """Attribute one query under several columns and keep the query's tokens' scores.

    With ``columns``, column ``j`` attributes the prompt ``columns[j] + ";" + query`` with
    ``method``; with ``methods``, column ``j`` attributes the bare query with ``methods[j]``.
    Every column attributes the *same* answer: ``target``, or by default the model's greedy
    answer to the bare query (a demonstration may change the greedy answer, and scores of
    different answers are not comparable across a row). Each column is one
    :func:`tokattr.attribute` call with ``seed``, so a column does not depend on the others.

    Returns:
        :class:`Heatmap` with ``matrix`` ``[len(query tokens), len(columns)]``. The query is
        the suffix of every prompt; its tokens are found through the token offsets. Rows are
        named as the tokenizer spells the bare query (``▁$`` in the seed figure, where the
        prompt after a demonstration spells ``$``) when both cut the query at the same
        characters, else as the prompts spell it (a bare ``7x5=`` is ``▁ 7 x 5 =``, after a
        demonstration ``7 x 5 =``: the lone word-start ``▁`` has no row).

    Raises:
        ValueError: see :func:`plan_columns` and :func:`tokattr.attribute`; a token across
            the boundary between demonstrations and query, or a query split differently in
            different columns.
    """
    plan = plan_columns(query, columns, methods, method, method_params)
    answer = default_target(lm, query) if target is None else target
    scores = []  # one [query tokens] tensor per column
    split: tuple[list[str], list[Span]] | None = None  # the query's tokens, spans in context
    for col in plan:
        res = attribute(
            lm,
            col.prompt,
            method=col.method,
            target=answer,
            baseline=baseline,
            seed=seed,
            batch_size=batch_size,
            **col.params,
        )
        rows = query_positions(res, query)  # [query tokens]
        start = len(res.prompt) - len(query)
        mine = (
            [res.tokens[i] for i in rows],
            [(res.offsets[i][0] - start, res.offsets[i][1] - start) for i in rows],
        )
        if split is not None and mine != split:
            raise ValueError(
                f"the query {query!r} is split into {split[0]} in column {plan[0].label!r} "
                f"but into {mine[0]} in column {col.label!r}: its rows would not line up"
            )
        split = mine
        scores.append(res.scores[rows])
    bare, bare_spans = query_tokens(lm, query, answer)
    tokens = bare if bare_spans == split[1] else split[0]
    matrix = torch.stack(scores, dim=1)  # [tokens, columns]
    return Heatmap(tokens, [c.label for c in plan], matrix)


def query_tokens(lm: LanguageModel, query: str, answer: str) -> tuple[list[str], list[Span]]:
    """The bare query's features (no BOS or other special token) as attribute() sees them,
    and their character spans."""
    enc = encode_example(lm.tokenizer, query, answer, max_length=lm.max_length)
    keep = [i for i, special in enumerate(enc.special) if not special]
    tokens = lm.tokenizer.convert_ids_to_tokens([enc.prompt_ids[i] for i in keep])
    return tokens, [enc.offsets[i] for i in keep]


def query_positions(res: Attribution, query: str) -> Tensor:
    """Indices into ``res.tokens`` of the query, the suffix of ``res.prompt``: ``[query tokens]``.

    Raises:
        ValueError: the prompt does not end with the query; no character offsets (a slow
            tokenizer) to find it by; a token across the boundary before the query.
    """
    if not res.prompt.endswith(query):
        raise ValueError(f"prompt {res.prompt!r} does not end with the query {query!r}")
    start = len(res.prompt) - len(query)
    if start > 0 and all(o == (0, 0) for o in res.offsets):
        raise ValueError("the tokenizer gives no character offsets; use a fast tokenizer")
    across = [t for t, (a, b) in zip(res.tokens, res.offsets, strict=True) if a < start < b]
    if across:
        raise ValueError(
            f"token(s) {across} of {res.prompt!r} run across the start of the query {query!r}: "
            "its rows would not line up"
        )
    return torch.tensor([i for i, (a, _) in enumerate(res.offsets) if a >= start])


# --------------------------------------------------------------------------- the figure


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


# --------------------------------------------------------------------------- the table


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
