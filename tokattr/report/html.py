"""``report.html``: one self-contained page of a finished run, and the figures beside it.

:func:`write_report` writes the PNGs under ``out_dir/figures/`` and ``out_dir/report.html``,
one file with every image embedded (data URIs), inline CSS and JS, no external URL, so it
can be mailed or attached as it is. The CSS and JS are package data
(``tokattr/report/static/``), read with :mod:`importlib.resources`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path

from matplotlib.figure import Figure

from tokattr.report.figures import (
    agreement_figure,
    arrow,
    erasure_curves_figure,
    example_heatmap,
    mean_erasure_curves,
    metrics_figure,
)
from tokattr.report.load import HEADLINE_K, Run, headline_metrics, load_run, method_costs
from tokattr.sanity import CONTROL, NOT_DISCRIMINATING, best_separation
from tokattr.table import format_value


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
    parts = [_summary_html(run), _metrics_html(run), _checks_html(run)]
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


def _checks_html(run: Run) -> str:
    """The metric checks (:mod:`tokattr.sanity`): one row per metric."""
    checks = run.checks
    if not checks:
        return ""
    titles = [
        "metric",
        f"methods told from {CONTROL}",
        "best effect [95% paired interval]",
        "resolution",
        "rank agreement",
        "verdict",
    ]
    head = [f'<th class="sortable" title="click to sort">{_esc(t)}</th>' for t in titles]
    body = []
    for c in checks:
        best = best_separation(run.sanity, c.metric)
        shown = (
            "—"
            if best is None
            else f"{best.method}: {format_value(best.effect)} [{format_value(best.ci_low)}, "
            f"{format_value(best.ci_high)}]"
        )
        verdict = c.verdict
        cells = [c.metric, f"{c.discriminated}/{c.methods}", shown]
        cells += [format_value(c.resolution), format_value(c.rank_agreement), verdict]
        keys = [c.metric, c.discriminated, best.effect if best else "", c.resolution]
        keys += [c.rank_agreement, verdict]
        body.append(_sortable_row(keys, cells))
    return (
        "<h2>Metric checks</h2>\n"
        + _table("checks", head, body)
        + f"\n<p>Effect: a method's mean minus {CONTROL}'s on the same examples, signed so "
        "that positive is better, with a paired 95% bootstrap interval (per method: "
        "metric_sanity.csv). Resolution: median interval width over the spread of the "
        "methods' means. Rank agreement: mean Kendall tau with the other metrics' rankings. "
        f"A metric that tells no method from {CONTROL} is marked ⚠ in the table above.</p>"
    )


def _metric_table(run: Run, columns: list[tuple[str, str, bool]], table_id: str) -> str:
    cells = {(r.method, r.metric, r.k): r for r in run.metrics}
    flagged = {c.metric for c in run.checks if c.flagged}
    head = ['<th class="sortable" title="click to sort">method</th>']
    for metric, k, higher in columns:
        name = metric + ("" if k in HEADLINE_K else f"@{k}")
        direction = "higher" if higher else "lower"
        warn = metric in flagged and k in HEADLINE_K
        head.append(
            f'<th class="sortable" title="{direction} is better'
            + (f"; {NOT_DISCRIMINATING}" if warn else "")
            + f'; click to sort">{_esc(name)} {arrow(higher)}{" ⚠" if warn else ""}</th>'
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


def _sortable_row(keys: list[object], shown: list[str]) -> str:
    """A table row whose cells sort by ``keys`` and show ``shown``."""
    cells = (f'<td data-sort="{_esc(k)}">{_esc(v)}</td>' for k, v in zip(keys, shown, strict=True))
    return "<tr>" + "".join(cells) + "</tr>"


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
        body.append(_sortable_row(keys, shown))
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
            f"<h3>{_esc(e)}</h3>\n<p>prompt <code>{_esc(first.prompt)}</code>, answer "
            f"<code>{_esc(first.answer or '')}</code></p>"
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
        + "".join(f"<td>{_esc(v)}</td>" for v in (r.example_id, r.method, r.prompt, r.error))
        + "</tr>"
        for r in errors
    ]
    return f"<h2>Errors ({len(errors)})</h2>\n" + _table("errors", head, body)


@cache
def _static(name: str) -> str:
    """A file of ``tokattr/report/static/``: ``report.css``, and ``report.js`` (click a header
    to sort its table by that column: numbers (``data-sort``) numerically, text
    alphabetically, empty cells last; a second click reverses)."""
    return (resources.files("tokattr.report") / "static" / name).read_text(encoding="utf-8")


def _page(title: str, body: str) -> str:
    css, js = _static("report.css"), _static("report.js")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>\n{css}</style>\n</head>\n"
        f"<body>\n{body}\n<script>\n{js}</script>\n</body>\n</html>\n"
    )
