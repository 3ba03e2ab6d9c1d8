"""``tokattr heatmap``: one query's tokens x columns (demonstrations or methods), PNG + CSV."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_QUERY = "$16,000/-0.8="
LIST_OPTIONS = ("--columns", "--methods")
"""Options also accepted as ``--columns a b c`` (several values after one flag)."""


def heatmap_command(
    query: str = DEFAULT_QUERY,
    columns: list[str] | None = None,
    methods: list[str] | None = None,
    model: str = "arith-tiny",
    method: str = "integrated_gradients",
    target: str | None = None,
    baseline: str = "pad",
    n_steps: int | None = None,
    rule: str | None = None,
    n_samples: int | None = None,
    seed: int | None = 0,
    batch_size: int | None = None,
    title: str | None = None,
    dpi: int = 150,
    out: str = "heatmap.png",
    features: str = "token",
    per_answer_token: bool = False,
) -> None:
    """Draw a token attribution heatmap of one query: a PNG and a CSV of the same matrix.

    Rows are the query's tokens, one column per demonstration (--columns) or per method
    (--methods), each cell's score printed to four decimals. The figure goes to --out and the
    matrix, at full precision, to a CSV beside it (same name, .csv). Every column attributes
    the same answer (--target, by default the model's greedy answer to the bare query), so a
    row compares like with like.

    Args:
        query: the prompt whose tokens are the rows, e.g. "$16,000/-0.8=".
        columns: demonstrations, one column each, placed before the query with the data set's
            separator: column "9 + 3 = 12" attributes "9 + 3 = 12;$16,000/-0.8=" (a column may
            hold several, "9+3=12;7x5=35"). Spelled --columns "9 + 3 = 12" "7 x 5 = 35", or
            --columns+ "9 + 3 = 12" --columns+ "7 x 5 = 35". Not with --methods.
        methods: attribution methods as columns, on the bare query: --methods saliency
            occlusion (names in tokattr.METHODS). Not with --columns.
        model: "arith-tiny" (the bundled model), a local model folder, or a hub id.
        method: the attribution method of every column given by --columns.
        target: the answer attributed in every column (default: the model's greedy answer to
            the bare query), e.g. --target -20000.
        baseline: what replaces a removed token's embedding: "pad", "unk" or "zero".
        n_steps: integration steps for integrated_gradients (default 64).
        rule: integration rule for integrated_gradients: "gausslegendre" (default),
            "adaptive_simpson" (the same steps where the path is steep), or a Riemann rule.
        n_samples: samples for kernel_shap (default 256) and shapley_sampling (default 25).
        seed: seed of the random methods, the same for every column; null for unseeded.
        batch_size: the most sequences per forward pass (default 64).
        title: the figure's title (default: model, query, answer and method).
        dpi: resolution of the PNG (its pixels are the figure size in inches x dpi).
        out: where to write the PNG; the CSV goes beside it with the suffix .csv.
        features: the rows: the query's "token"s (default), or its "word"s, "sentence"s,
            "line"s or parts between a separator ("separator:<s>").
        per_answer_token: the source x answer-token matrix of --method: one column per
            answer token, each attributing that token alone (given the earlier ones). Not
            with --columns or --methods.
    """
    from tokattr.heatmaps import default_target, heatmap_matrix, plan_columns
    from tokattr.models import load_model
    from tokattr.plots import plot_token_heatmap, write_heatmap_csv

    given = {
        k: v
        for k, v in (("n_steps", n_steps), ("rule", rule), ("n_samples", n_samples))
        if v is not None
    }
    if per_answer_token and (columns is not None or methods is not None):
        raise ValueError(
            "--per_answer_token draws one method's answer tokens as the columns; give --method, "
            "not --columns or --methods"
        )
    if not per_answer_token:
        plan_columns(query, columns, methods, method, given)  # bad input fails before loading
    from tokattr.features import feature_spans

    feature_spans(query, features)  # an unknown granularity fails before loading too
    png = Path(out)
    if png.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out!r}")

    lm = load_model(model)
    answer = default_target(lm, query) if target is None else target
    if per_answer_token:
        tokens, labels, matrix = answer_token_matrix(
            lm, query, method, answer, baseline, seed, batch_size, given, features
        )
        title = title or f"{Path(model).name}: {query} → {answer} ({method}, per answer token)"
    else:
        tokens, labels, matrix = heatmap_matrix(
            lm,
            query,
            columns=columns,
            methods=methods,
            method=method,
            target=answer,
            baseline=baseline,
            seed=seed,
            batch_size=batch_size,
            method_params=given,
            features=features,
        )
    if title is None:
        how = method if columns is not None else "methods"
        title = f"{Path(model).name}: {query} → {answer} ({how})"
    fig = plot_token_heatmap(matrix, tokens, labels, title=title, path=png, dpi=dpi)
    csv_path = write_heatmap_csv(png.with_suffix(".csv"), matrix, tokens, labels)
    width, height = fig.get_size_inches() * dpi
    print(
        f"attributed {answer!r}: {len(tokens)} "
        f"{'tokens' if features == 'token' else f'features ({features})'} x {len(labels)} "
        "columns\n"
        f"wrote {png} ({width:.0f} x {height:.0f} px)\n"
        f"wrote {csv_path}"
    )


def answer_token_matrix(
    lm: object,
    query: str,
    method: str,
    answer: str,
    baseline: str,
    seed: int | None,
    batch_size: int | None,
    params: dict,
    features: str,
) -> tuple[list[str], list[str], object]:
    """The query's tokens (or features) x answer tokens matrix of one method:
    ``per_answer_token=True``, transposed. ``(rows, column labels, [rows, answer tokens])``"""
    from tokattr.attribution import attribute

    res = attribute(
        lm, query, method, target=answer, baseline=baseline, seed=seed,
        batch_size=batch_size, per_answer_token=True, features=features, **params,
    )  # fmt: skip
    rows = list(res.tokens if features == "token" else res.features)
    labels = [f"{i + 1}: {t}" for i, t in enumerate(res.answer_tokens)]
    return rows, labels, res.scores.T  # [rows, answer tokens]


def spread_list_options(argv: list[str]) -> list[str]:
    """Turn ``--columns a b c`` into ``--columns='["a", "b", "c"]'`` for jsonargparse.

    jsonargparse reads one value per flag (a JSON/YAML list, or ``--columns+ a`` repeated);
    the issue's spelling puts several values after one flag. Values run up to the next
    argument starting with ``--``, so a demonstration such as ``-5 + 3 = -2`` stays a value.
    A single value that is already a list (``'["a", "b"]'``) is left to jsonargparse.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg not in LIST_OPTIONS:
            out.append(arg)
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if len(values) == 1 and values[0].lstrip().startswith("["):
            out += [arg, values[0]]
        elif values:
            # JSON keeps every value a string: '12' or 'a: b' must not become a number or a map.
            out.append(f"{arg}={json.dumps(values, ensure_ascii=False)}")
        else:
            out.append(arg)  # let jsonargparse report the missing value
    return out
