"""``tokattr.report``: figures and the HTML report of a finished run, on a synthetic ``out_dir``
written through :func:`tokattr.results.merge` (no model), and once on a real ``tokattr bench``
run (slow)."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from tokattr.report import (
    CSV_COLUMNS,
    agreement_figure,
    agreement_matrix,
    erasure_curves_figure,
    example_heatmap,
    format_score,
    headline_metrics,
    load_run,
    method_costs,
    metrics_figure,
    write_report,
)
from tokattr.results import RowWriter, merge

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["saliency", "integrated_gradients", "random"]
EXAMPLES = {  # id -> (prompt, answer, tokens); e2 has two '$' (mathtext if not escaped)
    "e0": ("$12<3=", "1", ["▁$", "1", "2", "<", "3", "="]),
    "e1": ("7x5=", "35", ["▁7", "x", "5", "="]),
    "e2": ("$9$+1=", "10", ["▁$", "9", "$", "+", "1", "="]),
}
SCALE = {"saliency": 0.01, "integrated_gradients": 25.0, "random": 1.0}
F_X = {"e0": -0.5, "e1": -2.0, "e2": -1.0}  # target score of the full prompt
F_BASE = {"e0": -30.0, "e1": -2.0, "e2": -12.0}  # e1: no gap, its curves are skipped


def _scores(example: str, method: str) -> list[float]:
    n = len(EXAMPLES[example][2])
    rng = np.random.default_rng([int(example[1:]), METHODS.index(method)])
    s = rng.normal(size=n) * SCALE[method]
    if method == "saliency":
        s = np.abs(s)  # gradient norms
    return s.tolist()


def _curves(example: str, method: str) -> dict[str, list[float]]:
    n = len(EXAMPLES[example][2])
    f_x, f_b = F_X[example], F_BASE[example]
    rng = np.random.default_rng([7, int(example[1:]), METHODS.index(method)])
    middle = (f_b + (f_x - f_b) * rng.uniform(-0.3, 1.2, size=n - 1)).tolist()
    if f_x == f_b:
        middle = [f_x] * (n - 1)
    return {"deletion": [f_x, *middle, f_b], "insertion": [f_b, *middle[::-1], f_x]}


def _row(example: str, method: str) -> dict:
    prompt, answer, tokens = EXAMPLES[example]
    i, j = int(example[1:]), METHODS.index(method)
    return {
        "example_id": example,
        "method": method,
        "prompt": prompt,
        "answer": answer,
        "tokens": tokens,
        "scores": _scores(example, method),
        "labels": ["formatting"] + ["operand"] * (len(tokens) - 1),
        "time_ms": 10.0 * (j + 1) + i,
        "model_evals": 3 * j + 1,
        "metrics": {
            "comprehensiveness": [0.1 * (i + j + k) for k in range(5)],
            "deletion_auc": 0.2 * i - 0.1 * j,
            "insertion_auc": None if (i, j) == (0, 0) else 0.3 * i + 0.05 * j,
            "loo_kendall_tau": (-1) ** i * 0.1 * (j + 1),
        },
        "curves": _curves(example, method),
    }


def _error_row(example: str, method: str) -> dict:
    prompt, answer, _ = EXAMPLES[example]
    return {
        "example_id": example,
        "method": method,
        "prompt": prompt,
        "answer": answer,
        "tokens": None,
        "scores": None,
        "labels": None,
        "time_ms": 0.0,
        "model_evals": 0,
        "metrics": {},
        "curves": None,
        "error": "too many tokens <for> this method",
    }


def _make_run(out: Path, error: bool = False) -> Path:
    """A finished run's out_dir: part file -> merge (attributions.jsonl, metrics.csv), plus the
    run.json and config.yaml the bench command writes. ``error``: (e2, random) failed."""
    writer = RowWriter(out / "parts" / "rank0.jsonl")
    writer.write(
        _error_row(e, m) if error and (e, m) == ("e2", "random") else _row(e, m)
        for e in EXAMPLES
        for m in METHODS
    )
    writer.close()
    merge(out, list(EXAMPLES), METHODS, n_bootstrap=50)
    identity = {
        "model": "arith-tiny",
        "examples": [[e, p, a] for e, (p, a, _) in EXAMPLES.items()],
        "methods": {m: {} for m in METHODS},
        "baseline": "pad",
    }
    (out / "run.json").write_text(json.dumps(identity))
    (out / "config.yaml").write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\ndata:\n  seed: 4242\n  n: 3\n"
    )
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _make_run(tmp_path / "run")


# --------------------------------------------------------------------------- load_run


def test_load_run(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.methods == tuple(METHODS)
    assert run.example_ids == tuple(EXAMPLES)
    assert len(run.rows) == 9 and not run.errors()
    assert run.row("e1", "random").scores == pytest.approx(_scores("e1", "random"))
    assert run.row("e9", "random") is None
    assert run.info["model"] == "arith-tiny"
    assert run.config["data"]["seed"] == 4242
    aopc = run.table.get("integrated_gradients", "comprehensiveness")
    assert aopc.k == "aopc" and aopc.higher_is_better and aopc.n == 3
    # Mean over examples of the mean over k of 0.1 * (i + j + k), j = 1.
    assert aopc.mean == pytest.approx(
        np.mean([0.1 * (i + 1 + k) for i in range(3) for k in range(5)])
    )
    assert run.table.get("saliency", "insertion_auc").n == 2  # one null value
    assert not run.table.get("saliency", "deletion_auc").higher_is_better
    assert headline_metrics(run) == [
        ("comprehensiveness", "aopc", True),
        ("deletion_auc", "", False),
        ("insertion_auc", "", True),
        ("loo_kendall_tau", "", True),
    ]


def test_load_run_refuses_an_unfinished_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        load_run(tmp_path / "nowhere")
    out = tmp_path / "run"
    writer = RowWriter(out / "parts" / "rank0.jsonl")
    writer.write([_row("e0", "saliency")])
    writer.close()
    with pytest.raises(FileNotFoundError, match=r"attributions\.jsonl.*run the same command"):
        load_run(out)
    (out / "attributions.jsonl").write_text(json.dumps(_row("e0", "saliency")) + "\n")
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv"):
        write_report(out)
    (out / "attributions.jsonl").write_text(2 * (json.dumps(_row("e0", "saliency")) + "\n"))
    (out / "metrics.csv").write_text(",".join(CSV_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_run(out)


def test_method_costs(run_dir: Path) -> None:
    costs = {c.method: c for c in method_costs(load_run(run_dir))}
    ig = costs["integrated_gradients"]
    assert (ig.examples, ig.errors) == (3, 0)
    assert ig.ms_per_example == pytest.approx(np.mean([20.0, 21.0, 22.0]))
    assert ig.time_s == pytest.approx(0.063)
    assert ig.evals_per_example == 4


# --------------------------------------------------------------------------- figures


def test_example_heatmap(run_dir: Path) -> None:
    run = load_run(run_dir)
    tokens = EXAMPLES["e0"][2]
    fig = example_heatmap(run, "e0")
    ax = fig.axes[0]
    raw = np.array([_scores("e0", m) for m in METHODS]).T  # [tokens, methods]
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (len(tokens), len(METHODS))
    # Colours: each column over its max |score|, so every column reaches +-1.
    np.testing.assert_allclose(image, raw / np.abs(raw).max(0), rtol=1e-6)
    np.testing.assert_allclose(np.abs(image).max(0), 1.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert [t.get_text() for t in ax.get_xticklabels()] == METHODS
    # Numbers: the raw scores, row by row.
    assert [t.get_text() for t in ax.texts] == [format_score(v) for v in raw.flat]
    assert "max |score|" in fig.axes[1].get_ylabel()
    assert "$12<3=" in ax.get_title().replace("\\$", "$")
    fig.canvas.draw()


def test_heatmap_title_keeps_dollars_literal(run_dir: Path) -> None:
    fig = example_heatmap(load_run(run_dir), "e2")
    assert r"\$9\$+1=" in fig.axes[0].get_title()  # not read as mathtext
    fig.canvas.draw()


def test_format_score() -> None:
    assert format_score(0.0123456) == "0.0123"
    assert format_score(-25.123456) == "-25.1235"
    assert format_score(4.8e-5) == "4.8e-05"
    assert format_score(0.0) == "0.0000"
    assert format_score(1234.56) == "1234.6"


def test_heatmap_leaves_out_a_method_that_failed(tmp_path: Path) -> None:
    run = load_run(_make_run(tmp_path / "run", error=True))
    ax = example_heatmap(run, "e2").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == METHODS[:2]
    with pytest.raises(KeyError, match="e9"):
        example_heatmap(run, "e9")


def _expected_mean_curve(method: str, which: str, x: np.ndarray) -> np.ndarray:
    curves = []
    for e in ("e0", "e2"):  # e1 has f(x) == f(baseline): skipped
        f = np.array(_curves(e, method)[which])
        y = (f - F_BASE[e]) / (F_X[e] - F_BASE[e])
        curves.append(np.interp(x, np.linspace(0, 1, len(f)), y))
    return np.mean(curves, axis=0)


def test_erasure_curves_figure(run_dir: Path) -> None:
    fig = erasure_curves_figure(load_run(run_dir))
    ax_del, ax_ins = fig.axes
    for ax, start, end, which in ((ax_del, 1, 0, "deletion"), (ax_ins, 0, 1, "insertion")):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [f"{m} (n=2)" for m in METHODS]
        for method, line in zip(METHODS, lines, strict=True):
            x, y = line.get_xdata(), line.get_ydata()
            assert len(x) == 21 and x[0] == 0 and x[-1] == 1
            assert y[0] == pytest.approx(start) and y[-1] == pytest.approx(end)
            np.testing.assert_allclose(y, _expected_mean_curve(method, which, x))
    # One colour per method in both panels.
    assert [line.get_color() for line in ax_del.get_lines()] == [
        line.get_color() for line in ax_ins.get_lines()
    ]


def test_erasure_curves_skip_null_curves(tmp_path: Path) -> None:
    run = load_run(_make_run(tmp_path / "run", error=True))  # (e2, random) has no curves
    labels = [line.get_label() for line in erasure_curves_figure(run).axes[0].get_lines()]
    assert labels == ["saliency (n=2)", "integrated_gradients (n=2)", "random (n=1)"]


@pytest.mark.parametrize("error", [False, True])
def test_agreement_matrix_matches_scipy(tmp_path: Path, error: bool) -> None:
    run = load_run(_make_run(tmp_path / "run", error=error))
    methods, matrix = agreement_matrix(run)
    assert methods == METHODS and matrix.shape == (3, 3)
    expected = np.eye(3)
    for i, a in enumerate(METHODS):
        for j, b in enumerate(METHODS):
            if i != j:
                rhos = [
                    spearmanr(_scores(e, a), _scores(e, b)).statistic
                    for e in EXAMPLES
                    if not (error and e == "e2" and "random" in (a, b))
                ]
                expected[i, j] = np.mean(rhos)
    np.testing.assert_allclose(matrix, expected, atol=1e-12)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)


def test_agreement_figure(run_dir: Path) -> None:
    fig = agreement_figure(load_run(run_dir))
    ax = fig.axes[0]
    assert np.asarray(ax.images[0].get_array()).shape == (3, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == METHODS
    assert [t.get_text() for t in ax.texts][::4] == ["1.00"] * 3  # the diagonal


def test_metrics_figure(run_dir: Path) -> None:
    run = load_run(run_dir)
    fig = metrics_figure(run)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4
    assert visible[0].get_title() == "comprehensiveness (AOPC) ↑"
    assert visible[1].get_title() == "deletion_auc ↓"
    heights = [p.get_height() for p in visible[1].patches]
    assert heights == pytest.approx([run.table.get(m, "deletion_auc").mean for m in METHODS])


# --------------------------------------------------------------------------- the report


class _Page(HTMLParser):
    """Every start tag with its attributes and the table it sits in; fails on a mismatched
    end tag."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.tags: list[tuple[str, dict, str | None]] = []  # (tag, attrs, enclosing table id)
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        tables = [t_attrs.get("id") for t, t_attrs in self.stack if t == "table"]
        self.tags.append((tag, a, tables[-1] if tables else None))
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, table: str | None = None) -> list[dict]:
        return [a for t, a, tab in self.tags if t == tag and (table is None or tab == table)]


def _parse(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.stack, f"unclosed tags {page.stack}"
    return text, page


def test_write_report(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    figures = run_dir / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(
        [f"heatmap_{e}.png" for e in EXAMPLES]
        + ["erasure_curves.png", "agreement.png", "metrics.png"]
    )
    text, page = _parse(path)

    # Every image is inlined: 3 heatmaps, curves, agreement, metrics.
    imgs = page.find("img")
    assert len(imgs) == 6
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Self-contained: no URL anywhere, no src/href outside the data URIs.
    assert "http://" not in text and "https://" not in text
    assert not page.find("link") and not page.find("a")
    assert all(a.get("src") is None for a in page.find("script"))

    # The method x metric table: one row per method, sortable headers with directions.
    heads = page.find("th", "metrics")
    assert all("sortable" in h["class"] for h in heads)
    header_text = "".join(page.text)
    for name, arrow in [("comprehensiveness", "↑"), ("deletion_auc", "↓")]:
        assert f"{name} {arrow}" in header_text
    assert len(page.find("tr", "metrics")) == 1 + len(METHODS)
    ig = load_run(run_dir).table.get("integrated_gradients", "comprehensiveness")
    assert f"{ig.mean:.3f} [{ig.ci_low:.3f}, {ig.ci_high:.3f}]" in text
    assert len(page.find("tr", "cost")) == 1 + len(METHODS)
    assert len(page.find("tr", "metrics-per-k")) == 1 + len(METHODS)
    assert "addEventListener" in text  # the sorting script

    # Text is escaped: the prompt with '<' never appears raw.
    assert "$12&lt;3=" in text and "$12<3=" not in text
    assert "arith-tiny" in text and "4242" in text  # run.json and config.yaml
    assert "None: every method scored every example" in text


def test_write_report_limits_heatmaps_and_lists_errors(tmp_path: Path) -> None:
    out = _make_run(tmp_path / "run", error=True)
    text, page = _parse(write_report(out, max_examples=2))
    assert sorted(p.name for p in (out / "figures").glob("heatmap_*.png")) == [
        "heatmap_e0.png",
        "heatmap_e1.png",
    ]
    assert len(page.find("img")) == 2 + 3
    rows = page.find("tr", "errors")
    assert len(rows) == 2  # header + the one error
    assert "too many tokens &lt;for&gt; this method" in text
    assert "too many tokens <for>" not in text


def test_report_imports_no_lightning() -> None:
    code = (
        "import sys, tokattr.report; "
        "assert not {'lightning', 'wandb'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path: Path) -> None:
    from tokattr.cli import main

    out = tmp_path / "run"
    argv = ["bench", "--config", str(ROOT / "configs/bench/quick.yaml"), "--max_examples", "4"]
    argv += ["--methods", '["occlusion","random"]', "--out_dir", str(out)]
    assert main(argv) == 0
    run = load_run(out)
    assert run.methods == ("occlusion", "random") and len(run.example_ids) == 4
    text, page = _parse(write_report(out))
    assert len(list((out / "figures").glob("heatmap_*.png"))) == 4
    assert len(page.find("img")) == 4 + 3
    assert len(page.find("tr", "metrics")) == 1 + 2
    assert len(page.find("tr", "checks")) == 1 + len(run.checks) and run.checks
    assert "Metric checks" in text
    assert "http://" not in text and "https://" not in text
    for line in erasure_curves_figure(run).axes[0].get_lines():
        assert line.get_ydata()[0] == pytest.approx(1.0)
    _, matrix = agreement_matrix(run)
    assert matrix.shape == (2, 2) and not math.isnan(matrix[0, 1])
