"""``tokattr heatmap`` and ``tokattr.plots``: the seed figure's layout, its numbers, bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import tokattr
from tokattr.accuracy import greedy_answers
from tokattr.cli import main
from tokattr.cli.heatmap import spread_list_options
from tokattr.data.arithmetic import with_demonstrations
from tokattr.heatmaps import heatmap_matrix, plan_columns
from tokattr.plots import COLORBAR_LABEL, plot_token_heatmap, write_heatmap_csv

QUERY = "$16,000/-0.8="
QUERY_TOKENS = ["▁$", "1", "6", ",", "0", "0", "0", "/", "-", "0", ".", "8", "="]
DEMOS = ["9 + 3 = 12", "7 x 5 = 35", "4900 / 100 = 49", "9 - 3 = 6", "6 - 6 = 0"]
N_STEPS = 8  # IG steps: enough to exercise the method, few enough to keep the test fast


@pytest.fixture(scope="module")
def lm():
    return tokattr.load_model("arith-tiny")


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """The seed figure through the CLI, in the issue's spelling: ``(png, stdout)``."""
    png = tmp_path_factory.mktemp("heatmap") / "seed.png"
    argv = ["heatmap", "--model", "arith-tiny", "--query", QUERY, "--columns", *DEMOS]
    argv += ["--method", "integrated_gradients", "--n_steps", str(N_STEPS), "--out", str(png)]
    out = io.StringIO()  # capsys is per test; this fixture serves the module
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return png, out.getvalue()


def read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(tokens, labels, matrix [tokens, labels])`` as written by the command."""
    with path.open(encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[0] == "token"
    matrix = np.array([[float(v) for v in r[1:]] for r in rows])
    return [r[0] for r in rows], header[1:], matrix


def test_seed_csv_equals_attribute_per_column(lm, seed_run):
    png, stdout = seed_run
    tokens, labels, matrix = read_csv(png.with_suffix(".csv"))
    assert tokens == QUERY_TOKENS and labels == DEMOS and matrix.shape == (13, 5)
    assert f"wrote {png}" in stdout and f"wrote {png.with_suffix('.csv')}" in stdout

    # Every column attributes the bare query's greedy answer, whatever precedes it.
    (answer,) = greedy_answers(lm, [QUERY])
    for j, demo in enumerate(DEMOS):
        prompt = with_demonstrations([demo], QUERY)
        res = tokattr.attribute(
            lm, prompt, method="integrated_gradients", target=answer, seed=0, n_steps=N_STEPS
        )
        # The character tokenizer spells the query as its last 13 tokens ('$' without '▁').
        assert [t.lstrip("▁") for t in res.tokens[-13:]] == [t.lstrip("▁") for t in tokens]
        np.testing.assert_array_equal(matrix[:, j], res.scores[-13:].double().numpy())


def test_png_size_and_layout(seed_run):
    png, _ = seed_run
    tokens, labels, matrix = read_csv(png.with_suffix(".csv"))
    drawn = png.parent / "again.png"
    fig = plot_token_heatmap(matrix, tokens, labels, title="seed", path=drawn, dpi=100)

    size = fig.get_size_inches()[::-1]  # (height, width) inches
    # Agg truncates the pixel size, so allow for the fraction of a pixel.
    assert np.abs(np.array(imread(drawn).shape[:2]) - size * 100).max() < 1
    # The command's PNG: the same figure size at its default 150 dpi.
    assert np.abs(np.array(imread(png).shape[:2]) - size * 150).max() < 1

    ax, cbar_ax = fig.axes
    (image,) = ax.images
    assert image.get_array().shape == (13, 5)
    assert [t.get_text() for t in ax.get_yticklabels()] == QUERY_TOKENS
    assert [t.get_text() for t in ax.get_xticklabels()] == DEMOS
    assert ax.get_title() == "seed"
    assert image.colorbar.ax is cbar_ax
    assert cbar_ax.get_ylabel() == COLORBAR_LABEL
    vmin, vmax = image.get_clim()
    assert vmin == -vmax == -np.abs(matrix).max()
    assert image.get_cmap().name == "RdYlGn"
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(cells) == 65
    for (i, j), v in np.ndenumerate(matrix):
        assert cells[i, j].get_text() == f"{v:.4f}"


def test_figure_grows_with_rows_and_columns():
    small = plot_token_heatmap(np.zeros((3, 2)), ["a", "b", "c"], ["x", "y"])
    wide = plot_token_heatmap(np.zeros((3, 8)), ["a", "b", "c"], list("abcdefgh"))
    tall = plot_token_heatmap(np.zeros((30, 2)), list(map(str, range(30))), ["x", "y"])
    assert wide.get_size_inches()[0] > small.get_size_inches()[0]
    assert tall.get_size_inches()[1] > small.get_size_inches()[1]
    # An all-zero matrix still gets a usable, symmetric scale.
    assert small.axes[0].images[0].get_clim() == (-1.0, 1.0)


def test_methods_as_columns(lm, tmp_path, capsys):
    png = tmp_path / "methods.png"
    argv = ["heatmap", "--query", "7x5=", "--methods+", "saliency", "--methods+", "occlusion"]
    assert main([*argv, "--target", "35", "--out", str(png)]) == 0
    assert str(png.with_suffix(".csv")) in capsys.readouterr().out
    tokens, labels, matrix = read_csv(png.with_suffix(".csv"))
    assert labels == ["saliency", "occlusion"] and imread(png).ndim == 3
    for j, method in enumerate(labels):
        res = tokattr.attribute(lm, "7x5=", method=method, target="35", seed=0)
        assert tokens == res.tokens
        np.testing.assert_array_equal(matrix[:, j], res.scores.double().numpy())


def test_per_answer_token_columns(lm, tmp_path, capsys):
    """``--per_answer_token``: one column per answer token, each the matrix row of
    ``per_answer_token=True`` (the source x answer-token matrix, transposed)."""
    png = tmp_path / "tokens.png"
    argv = ["heatmap", "--query", "12x31=", "--method", "input_x_gradient", "--target", "372"]
    assert main([*argv, "--per_answer_token", "true", "--out", str(png)]) == 0
    assert "3 columns" in capsys.readouterr().out
    tokens, labels, matrix = read_csv(png.with_suffix(".csv"))
    assert labels == ["1: 3", "2: 7", "3: 2"] and imread(png).ndim == 3
    res = tokattr.attribute(lm, "12x31=", "input_x_gradient", target="372", per_answer_token=True)
    assert tokens == res.tokens
    np.testing.assert_array_equal(matrix, res.scores.T.double().numpy())
    assert main([*argv, "--per_answer_token", "true", "--methods", "saliency"]) == 1
    assert "not --columns or --methods" in capsys.readouterr().err


def test_heatmap_matrix_finds_the_query_after_several_demonstrations(lm):
    (answer,) = greedy_answers(lm, ["7x5="])
    tokens, labels, matrix = heatmap_matrix(
        lm, "7x5=", columns=["9+3=12;6-6=0", "1+1=2"], method="occlusion"
    )
    # Alone, '7x5=' is '▁ 7 x 5 ='; after a demonstration '7 x 5 =': the rows are the latter.
    assert tokens == ["7", "x", "5", "="] and labels == ["9+3=12;6-6=0", "1+1=2"]
    res = tokattr.attribute(lm, "9+3=12;6-6=0;7x5=", method="occlusion", target=answer, seed=0)
    assert matrix.shape == (4, 2) and matrix[:, 0].equal(res.scores[-4:])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--columns", "9+3=12", "--methods", "saliency"], "not both"),
        ([], "no columns"),
        (["--query=", "--methods", "saliency"], "empty query"),
        (["--methods", "saliency", "nope"], "unknown method 'nope'"),
        (["--columns", "9+3=12", "--method", "nope"], "unknown method 'nope'"),
        (["--columns", "9+3=12", "9+3=12"], "repeated column"),
        (["--columns", "9+3=12;", "--method", "saliency"], "empty demonstration"),
        (["--methods", "saliency", "--n_steps", "4"], "taken by none of the methods"),
        (["--methods", "saliency", "--out", "fig.jpg"], "must name a .png"),
    ],
)
def test_bad_input_is_refused_with_exit_code_1(args, message, capsys):
    assert main(["heatmap", *args]) == 1
    err = capsys.readouterr().err
    assert "tokattr heatmap: error:" in err and message in err


def test_spread_list_options():
    argv = ["--columns", "9 + 3 = 12", "-5 + 3 = -2", "--method", "saliency"]
    assert spread_list_options(argv) == [
        '--columns=["9 + 3 = 12", "-5 + 3 = -2"]',
        "--method",
        "saliency",
    ]
    # One value stays one value (numbers stay strings); a list is jsonargparse's to parse.
    assert spread_list_options(["--methods", "12"]) == ['--methods=["12"]']
    assert spread_list_options(["--methods", '["a", "b"]']) == ["--methods", '["a", "b"]']
    repeated = ["--methods+", "a", "--methods+", "b", "--query", "x"]
    assert spread_list_options(repeated) == repeated


def test_plan_columns_spells_the_prompts():
    plan = plan_columns("7x5=", columns=["9+3=12", "1+1=2;2+2=4"], method_params={"n_steps": 4})
    assert [c.prompt for c in plan] == ["9+3=12;7x5=", "1+1=2;2+2=4;7x5="]
    assert {c.method for c in plan} == {"integrated_gradients"}
    assert plan[0].params == {"n_steps": 4}
    plan = plan_columns("7x5=", methods=["saliency", "kernel_shap"], method_params={"n_samples": 8})
    assert [(c.prompt, c.params) for c in plan] == [("7x5=", {}), ("7x5=", {"n_samples": 8})]
    given = {"n_steps": 9, "rule": "adaptive_simpson"}
    plan = plan_columns("7x5=", methods=["integrated_gradients", "occlusion"], method_params=given)
    assert [c.params for c in plan] == [given, {}]


def test_shapes_must_match(tmp_path):
    with pytest.raises(ValueError, match="2 tokens x 1 columns"):
        plot_token_heatmap(np.zeros((3, 1)), ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="finite"):
        write_heatmap_csv(tmp_path / "x.csv", np.full((1, 1), np.nan), ["a"], ["x"])


def test_help_lists_heatmap(capsys):
    assert main(["--help"]) == 0
    assert "heatmap" in capsys.readouterr().out


def test_heatmap_modules_import_no_lightning_or_wandb():
    code = (
        "import sys, tokattr; assert 'tokattr.plots' not in sys.modules; "
        "import tokattr.plots, tokattr.cli.heatmap; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'wandb') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_feature_rows_are_the_querys_features(lm, tmp_path, capsys):
    """--features: the rows are the query's features; with demonstrations as columns, the
    query is one feature of each prompt (``separator:;``) and its score is that column's."""
    heat = heatmap_matrix(lm, "7 x 5 =", columns=["9+3=12", "1+1=2;2+2=4"], method="occlusion",
                          target="35", features="separator:;")  # fmt: skip
    assert heat.tokens == ["7 x 5 ="]
    for j, demo in enumerate(["9+3=12", "1+1=2;2+2=4"]):
        res = tokattr.attribute(lm, f"{demo};7 x 5 =", method="occlusion", target="35",
                                features="separator:;")  # fmt: skip
        assert float(heat.matrix[0, j]) == float(res.scores[-1])
    png = tmp_path / "words.png"
    argv = ["heatmap", "--query", "7 x 5 =", "--methods+", "occlusion", "--features", "word"]
    assert main([*argv, "--target", "35", "--out", str(png)]) == 0
    assert "4 features (word) x 1 columns" in capsys.readouterr().out
    tokens, _, _ = read_csv(png.with_suffix(".csv"))
    assert tokens == ["7", "x", "5", "="]
    assert main([*argv[:-1], "paragraph", "--out", str(png)]) == 1
    assert "unknown features 'paragraph'" in capsys.readouterr().err
