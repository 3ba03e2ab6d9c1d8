"""``tokattr bench`` logs the finished run to W&B (offline) and writes report.html: read back
with W&B's own client (``wandb leet inspect --summary``) and from the media files."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokattr.cli import main
from tokattr.lightning.wandb_log import SUMMARY_COLUMNS, TOKEN_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).parent / "wandb")
METHODS = ["occlusion", "random", "saliency"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wandb") / "run"
    code = main(["bench", "--config", str(ROOT / "configs/bench/quick.yaml"),
                 "--max_examples", "4", "--methods", json.dumps(METHODS),
                 "--out_dir", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_the_logger_raises_no_deprecation_warning(tmp_path, capfd, recwarn):
    """W&B's offline run starts with no deprecation warning of the arguments we (or Lightning,
    for us) pass it: none printed by wandb, none raised."""
    from tokattr.lightning.wandb_log import make_logger

    logger = make_logger(tmp_path, "tokattr-test")
    try:
        assert logger.experiment is not None
    finally:
        import wandb

        wandb.finish()
    err = capfd.readouterr().err
    assert "wandb" in err  # its start-up lines are captured here
    assert "no effect" not in err and "deprecat" not in err.lower(), err
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def _media(run: Path, kind: str, key: str) -> list[Path]:
    return sorted((run / "files" / "media" / kind).glob(f"{key}_*"))


def _the_run(run_dir: Path) -> Path:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 0 only, one run
    return runs[0]


def test_the_offline_run_summary_as_wandb_reads_it(run_dir):
    run = _the_run(run_dir)
    has_leet = subprocess.run([WANDB, "leet", "--help"], capture_output=True, timeout=120)
    if has_leet.returncode != 0:
        pytest.skip("this wandb has no `wandb leet` to read an offline run with (newer ones do)")
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", str(run)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = out.stdout
    assert "finished" in summary
    for key in ("metrics", "token_scores", "heatmaps", "erasure_curves", "erasure_curves_table",
                "agreement", "agreement_table", "metrics_chart"):  # fmt: skip
        assert f"\n  {key} " in summary, key
    for m in METHODS:
        assert f"{m}/comprehensiveness" in summary
    assert "model.model" in summary and "arith-tiny" in summary  # the run config


def test_the_offline_run_holds_every_figure_and_table(run_dir):
    run = _the_run(run_dir)
    with (run_dir / "attributions.jsonl").open() as f:
        rows = [json.loads(line) for line in f]
    with (run_dir / "metrics.csv").open() as f:
        metric_rows = list(csv.DictReader(f))
    (tokens,) = _media(run, "table", "token_scores")
    table = json.loads(tokens.read_text())
    assert table["columns"] == TOKEN_COLUMNS
    assert len(table["data"]) == sum(len(r["tokens"]) for r in rows)
    (metrics,) = _media(run, "table", "metrics")
    table = json.loads(metrics.read_text())
    assert table["columns"] == SUMMARY_COLUMNS
    assert len(table["data"]) == len(metric_rows)
    (agreement,) = _media(run, "table", "agreement_table")
    table = json.loads(agreement.read_text())
    assert table["columns"] == ["method", *METHODS] and len(table["data"]) == 3
    assert len(_media(run, "images", "heatmaps")) == 4  # one per example
    for key in ("erasure_curves", "agreement", "metrics_chart"):
        assert len(_media(run, "images", key)) == 1, key


def test_the_report_and_figures_are_on_disk(run_dir):
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4 + 3
    assert "http://" not in report and "https://" not in report
    figures = {p.name for p in (run_dir / "figures").glob("*.png")}
    assert {"erasure_curves.png", "agreement.png", "metrics.png"} <= figures
    assert sum(name.startswith("heatmap_") for name in figures) == 4


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, profile: Path, size: str = "1280,2400") -> str:
    """Open ``page`` in headless Chromium, save a screenshot; returns Chromium's log."""
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         f"--window-size={size}", f"--screenshot={png}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"
)
def test_report_opens_in_headless_chromium(run_dir, tmp_path):
    png = tmp_path / "report.png"
    log = screenshot(run_dir / "report.html", png, tmp_path / "profile")
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    from matplotlib.image import imread

    img = imread(png)  # [height, width, channels]
    assert img.shape[:2] == (2400, 1280)
    assert img[..., :3].std() > 0.05  # a page was drawn, not a blank
