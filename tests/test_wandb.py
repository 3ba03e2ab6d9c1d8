"""``tokattr bench`` logs to W&B (offline) as it runs and at the end, writes the dashboard spec
and report.html: read back from what W&B wrote (the run's ``.wandb`` record log, parsed by
``tests/_wandb_reader.py``; ``wandb leet inspect --summary`` where this wandb has it; the media
and staging files), and from a CSVLogger's ``metrics.csv``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _wandb_reader import read_run

from tokattr.cli import main
from tokattr.lightning.wandb_log import (
    CHECK_COLUMNS,
    HEATMAP_SIZE,
    SUMMARY_COLUMNS,
    TOKEN_COLUMNS,
)
from tokattr.sanity import SANITY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).parent / "wandb")
METHODS = ["occlusion", "random", "saliency"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wandb") / "run"
    code = main(["bench", "--config", str(ROOT / "configs/bench/quick.yaml"),
                 "--max_examples", "4", "--data.batch_size", "2", "--methods", json.dumps(METHODS),
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
    with (run_dir / "metric_sanity.csv").open() as f:
        sanity_rows = list(csv.DictReader(f))
    (sanity,) = _media(run, "table", "metric_sanity")
    table = json.loads(sanity.read_text())
    assert table["columns"] == list(SANITY_COLUMNS)
    assert len(table["data"]) == len(sanity_rows) > 0
    assert {row[1] for row in table["data"]} == {"occlusion", "saliency"}  # random: the control
    (checks,) = _media(run, "table", "metric_checks")
    table = json.loads(checks.read_text())
    assert table["columns"] == list(CHECK_COLUMNS)
    assert {row[0] for row in table["data"]} == {r["metric"] for r in sanity_rows}
    (agreement,) = _media(run, "table", "agreement_table")
    table = json.loads(agreement.read_text())
    assert table["columns"] == ["method", *METHODS] and len(table["data"]) == 3
    (heatmaps,) = _media(run, "table", "heatmaps")
    table = json.loads(heatmaps.read_text())
    assert table["columns"] == ["example_id", "bucket", "method", "answer", "top_feature",
                                "top_label", "heatmap"]  # fmt: skip
    with (run_dir / "attributions.jsonl").open() as f:
        buckets = {json.loads(line)["bucket"] for line in f}
    assert {row[1] for row in table["data"]} == buckets and None not in buckets
    assert len(table["data"]) == 4 * len(METHODS)  # one per example and method
    assert not _media(run, "images", "heatmaps")  # no images of several sizes under one key
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


def _staged(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "wandb" / "data").rglob("*") if p.is_file()]


def test_table_media_are_staged_inside_out_dir(run_dir):
    """The heatmap images of the examples table (uploaded at ``wandb sync`` from W&B's staging
    folder) are under ``out_dir/wandb/data``, all of one size, and the staged table names
    them."""
    from PIL import Image

    staged = _staged(run_dir)
    pngs = [p for p in staged if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    sizes = set()
    for p in pngs:
        with Image.open(p) as image:
            sizes.add(image.size)
    assert HEATMAP_SIZE in sizes
    tables = [json.loads(p.read_text()) for p in staged if p.read_bytes()[:1] == b"{"]
    heats = [t for t in tables if t.get("columns", [None])[-1] == "heatmap"]
    assert heats  # the artifact's copy (W&B may stage it more than once)
    for heat in heats:
        cells = [row[-1] for row in heat["data"]]
        assert len(cells) == 4 * len(METHODS)
        assert all(c["_type"] == "image-file" for c in cells)
        assert {(c["width"], c["height"]) for c in cells} == {HEATMAP_SIZE}
    assert "WANDB_DATA_DIR" not in os.environ or str(run_dir) not in os.environ["WANDB_DATA_DIR"]


def test_the_run_record_has_live_rows_charts_and_tables(run_dir):
    """Read from the ``.wandb`` file: live rows from the first batch on (the step is the rows
    done), a native chart spec per headline metric and per erasure curve, every table."""
    rec = read_run(_the_run(run_dir))
    live = [h for h in rec["history"] if "live/examples_done" in h]
    total = 4 * len(METHODS)
    steps = [h["trainer/global_step"] for h in live]
    assert steps == sorted(steps) and steps[-1] == total
    assert [h["live/examples_done"] for h in live] == steps
    assert any(0 < s < total for s in steps)  # logged while the run was still going
    last = {k.removeprefix("live/"): v for k, v in live[-1].items() if k.startswith("live/")}
    for m in METHODS:
        assert last[f"{m}/examples"] == 4 and last[f"{m}/errors"] == 0
        assert f"{m}/comprehensiveness" in last and last[f"{m}/seconds_per_example"] >= 0
    with (run_dir / "attributions.jsonl").open() as f:
        rows = [json.loads(line) for line in f]
    occ = [
        sum(v) / len(v)
        for v in (r["metrics"]["comprehensiveness"] for r in rows if r["method"] == "occlusion")
    ]  # AOPC per example
    assert last["occlusion/comprehensiveness"] == pytest.approx(sum(occ) / len(occ))
    charts = {k.removeprefix("charts/"): v
              for k, v in rec["config"]["_wandb"]["visualize"].items()}  # fmt: skip
    with (run_dir / "metrics.csv").open() as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    for metric in metrics:
        assert charts[metric]["panel_config"]["panelDefId"] == "wandb/bar/v0", metric
        assert rec["summary"][f"charts/{metric}_table"]["_type"] == "table-file"
    for curve in ("deletion_curve", "insertion_curve"):
        assert charts[curve]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert charts["cost_ms_per_example"]["panel_config"]["panelDefId"] == "wandb/bar/v0"
    assert charts["agreement"]["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"
    for table in ("metrics", "heatmaps", "token_scores", "cost", "erasure_curves_table",
                  "agreement_table"):  # fmt: skip
        assert rec["summary"][table]["_type"] == "table-file", table
    assert rec["config"]["model"]["model"] == "arith-tiny"  # the run's config


def test_the_dashboard_reads_exactly_the_keys_the_run_logged(run_dir):
    """``wandb_dashboard.json`` round-trips through wandb-workspaces, and its panels read every
    key the ``.wandb`` file holds and no other (a renamed key fails here)."""
    from wandb_workspaces.workspaces import Workspace

    from tokattr.lightning.dashboard import build_report, load_dashboard, panel_keys, report_keys

    workspace, spec = load_dashboard(run_dir)
    assert isinstance(workspace, Workspace)
    assert [s.name for s in workspace.sections][:2] == ["Leaderboard", "Live progress"]
    rec = read_run(_the_run(run_dir))
    logged = {k for k in rec["summary"] if not k.startswith("_") and k != "trainer/global_step"}
    assert panel_keys(workspace) == logged
    assert set(spec["keys"]) == logged
    # The report push saves too, built offline from the same spec: the same keys.
    report = build_report(spec, "me", "tokattr")
    assert report_keys(report) == logged
    assert [b.text for b in report.blocks if type(b).__name__ == "H2"][:2] == [
        "Leaderboard", "Live progress"]  # fmt: skip
    # Round trip: the spec written again from the loaded workspace is the same spec.
    again = workspace._to_model().model_dump(mode="json", by_alias=True)
    assert again["spec"] == spec["view"]["spec"]


def test_dashboard_commands(run_dir, tmp_path, monkeypatch):
    run = subprocess.run([sys.executable, "-m", "tokattr.cli", "dashboard", "check",
                          str(run_dir)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "valid" in run.stdout
    env = dict(os.environ, WANDB_MODE="offline")
    push = [sys.executable, "-m", "tokattr.cli", "dashboard", "push", "--entity", "me",
            "--project", "tokattr", str(run_dir)]  # fmt: skip
    run = subprocess.run(push, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1
    assert "WANDB_MODE=offline: pushing a dashboard needs W&B online" in run.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no key
    env["WANDB_CONFIG_DIR"] = str(tmp_path)
    run = subprocess.run(push, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1 and "no W&B API key" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "tokattr.cli", "dashboard", "check",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and "no dashboard spec at" in run.stderr


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_log_live_to_wandb_and_csv_and_resume_the_same_run(tmp_path):
    """A 2-process DDP run: live rows from the first batch in the W&B run and in a CSVLogger,
    the charts at the end, no image-size warning; an interrupted run resumed in the same
    out_dir continues the same W&B run id."""
    out = tmp_path / "ddp"
    methods = ["occlusion", "random"]
    cmd = [sys.executable, "-m", "tokattr.cli", "bench",
           "--config", str(ROOT / "configs/bench/quick.yaml"), "--out_dir", str(out),
           "--methods", json.dumps(methods), "--max_examples", "8", "--data.batch_size", "2",
           "--model.metrics", json.dumps(["comprehensiveness", "loo_kendall_tau"]),
           "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.logger", json.dumps({
               "class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(out / "csv")}})]  # fmt: skip
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT)

    def bench() -> subprocess.CompletedProcess:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Images sizes do not match" not in run.stderr + run.stdout
        return run

    bench()
    total = 8 * len(methods)
    (first,) = sorted((out / "wandb").glob("offline-run-*"))
    rec = read_run(first)
    steps = [h["trainer/global_step"] for h in rec["history"] if "live/examples_done" in h]
    assert steps[-1] == total and any(0 < s < total for s in steps), steps
    charts = rec["config"]["_wandb"]["visualize"]
    assert {"charts/comprehensiveness", "charts/loo_kendall_tau"} <= set(charts)
    assert rec["summary"]["heatmaps"]["_type"] == "table-file"
    (csv_file,) = (out / "csv").rglob("metrics.csv")
    with csv_file.open() as f:
        done = [float(r["live/examples_done"]) for r in csv.DictReader(f)]
    assert done == sorted(done) and done[-1] == total and any(0 < d < total for d in done)
    # Interrupt: keep two rows per rank, as if the run had been killed there.
    for part in (out / "parts").glob("rank*.jsonl"):
        part.write_text("".join(part.read_text().splitlines(keepends=True)[:2]))
    (out / "attributions.jsonl").unlink()
    bench()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    again = read_run(runs[1])
    assert again["run_id"] == rec["run_id"] == (out / "wandb" / "run_id").read_text().strip()
    steps = [h["trainer/global_step"] for h in again["history"] if "live/examples_done" in h]
    assert steps[0] == 4 and steps[-1] == total, steps
