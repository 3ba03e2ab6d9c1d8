"""``scripts/gpu_check.sh --dry-run``: the GPU check's every step, on the CPU (cuda tests
collected and skipped, the bench collected, FSDP2 at world size 1 on gloo, a device_map run
offloading to disk compared with the whole model), so the script is ready when a GPU is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_every_step():
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    (report,) = re.findall(r"report: (\S+dry-run-check\.md)", out)
    text = Path(report).read_text()
    steps = re.findall(r"^\| ([^|]+) \| (passed|failed[^|]*|stopped[^|]*) \|", text, re.M)
    assert [s for s, _ in steps] == [
        "cuda-marked tests", "bench quick fp32", "bench bf16 (100M Llama, 64 and 256 tokens)",
        "FSDP2 at world size 1", "whole model", 'device_map with max_memory {"cpu": "4MiB"}',
        "device_map equals the whole model", "long prompts, every token (100M Llama)",
    ]  # fmt: skip
    assert all(status == "passed" for _, status in steps), steps
    assert "largest score difference 0.00e+00" in text
    assert "| occlusion |" in text  # the FSDP2 run's summary
    assert not list((ROOT / "bench/results").glob("dry-run-*"))  # nothing left in the repo
    long = json.loads((Path(report).parent / "dry-run-long-prompts.json").read_text())
    assert {(r["method"], r["features"], r["status"]) for r in long["records"]} == {
        ("forward", "tokens", "ok"), ("occlusion", "tokens", "ok"),
    }  # fmt: skip


def test_gpu_check_steps_fit_ten_minutes():
    """The steps' time limits add up to at most 10 minutes (what a lent GPU is held for)."""
    text = (ROOT / "scripts/gpu_check.sh").read_text()
    limits = [int(x) for x in re.findall(r'^step "[^"]+" (\d+) ', text, re.M)]
    assert len(limits) == 8 and sum(limits) <= 600, limits


def test_gpu_check_refuses_unknown_arguments():
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "usage" in run.stderr
