"""``tokattr bench``: 1 process == 2 processes, kill-and-resume, configs, help and refusals.

Multi-process and kill tests run the real command in a subprocess (``strategy="ddp"`` inside
pytest would re-run pytest in the second process)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tokattr.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKATTR = [sys.executable, "-m", "tokattr.cli"]

# Small but real: a gradient method, a perturbation method, a random method with per-example
# seeds, and metrics that re-evaluate the model, use random perturbations, or a second model.
SMALL = [
    "--config", str(ROOT / "configs/bench/quick.yaml"),
    "--model.methods", json.dumps({
        "integrated_gradients": {"n_steps": 8}, "occlusion": {}, "kernel_shap": {"n_samples": 16},
        "random": {},
    }),
    "--model.metrics", json.dumps([
        "comprehensiveness", "loo_kendall_tau", "infidelity", "randomization_spearman",
        "shapley_error", "plausibility_auprc", "soft_sufficiency", "soft_comprehensiveness",
    ]),
    "--model.metric_params", json.dumps({"infidelity": {"n_perturb_samples": 4}}),
    "--data.n", "16",
    "--data.batch_size", "4",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _bench(out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TOKATTR, "bench", *SMALL, "--out_dir", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)


def _rows(out: Path) -> list[dict]:
    with (out / "attributions.jsonl").open() as f:
        return [json.loads(line) for line in f]


def _assert_same_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [(r["example_id"], r["method"]) for r in a] == [
        (r["example_id"], r["method"]) for r in b
    ]
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and x["labels"] == y["labels"]
        assert x["scores"] == pytest.approx(y["scores"], rel=tol, abs=tol), (
            x["example_id"],
            x["method"],
        )
        assert set(x["metrics"]) == set(y["metrics"])
        for name, v in x["metrics"].items():
            assert _nan(v) == pytest.approx(_nan(y["metrics"][name]), rel=tol, abs=tol, nan_ok=True)


def _nan(v):
    """JSON null (an undefined metric) back to NaN."""
    if isinstance(v, list):
        return [math.nan if e is None else e for e in v]
    return math.nan if v is None else v


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "one"
    run = _bench(out)
    assert run.returncode == 0, run.stderr[-3000:]
    (out.parent / "one.stdout").write_text(run.stdout)
    return out


def test_outputs_of_one_process(one_process):
    rows = _rows(one_process)
    assert len(rows) == 16 * 4
    keys = {(r["example_id"], r["method"]) for r in rows}
    assert len(keys) == len(rows)  # no duplicate
    for r in rows:
        for field in ("example_id", "method", "prompt", "answer", "tokens", "scores", "labels",
                      "time_ms", "model_evals"):  # fmt: skip
            assert field in r
        assert len(r["scores"]) == len(r["tokens"]) == len(r["labels"])
    with (one_process / "metrics.csv").open() as f:
        head = f.readline().strip()
    assert head == "method,metric,k,mean,ci_low,ci_high,higher_is_better,n"
    summary = (one_process / "summary.md").read_text()
    assert "↑" in summary and "## Metric checks" in summary and "*told from random*" in summary
    printed = (one_process.parent / "one.stdout").read_text()
    assert "*told from random*" in printed and "## Metric checks" in printed
    sanity = (one_process / "metric_sanity.csv").read_text().splitlines()
    assert sanity[0] == "metric,method,effect,ci_low,ci_high,discriminates"
    # One row per metric x method other than the control (shapley_error: kernel_shap only).
    assert len(sanity) - 1 == 7 * 3 + 1
    assert (one_process / "config.yaml").exists()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_equal_one(one_process, tmp_path):
    out = tmp_path / "two"
    run = _bench(out, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == ["rank0.jsonl", "rank1.jsonl"]  # both processes worked
    _assert_same_rows(_rows(one_process), _rows(out))
    assert (out / "metrics.csv").read_text().splitlines()[0] == (
        one_process / "metrics.csv"
    ).read_text().splitlines()[0]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(one_process, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*TOKATTR, "bench", *SMALL, "--out_dir", str(out)],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = out / "parts" / "rank0.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once some but not all rows are on disk
        if part.exists() and part.read_text().count("\n") >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = part.read_text().count("\n")
    assert 0 < written < 64, written
    assert not (out / "attributions.jsonl").exists()
    run = _bench(out)
    assert run.returncode == 0, run.stderr[-3000:]
    # Every complete row is kept, a batch cut short by the kill included: only the missing
    # (example, method) pairs run again.
    assert f"({written} of 64 results already done," in run.stderr
    rows = _rows(out)
    assert len({(r["example_id"], r["method"]) for r in rows}) == len(rows) == 64
    _assert_same_rows(_rows(one_process), rows)


def test_a_changed_config_is_refused_unless_overwrite(one_process, tmp_path):
    out = tmp_path / "changed"
    out.mkdir()
    (out / "run.json").write_text((one_process / "run.json").read_text())
    code = main(["bench", *SMALL, "--out_dir", str(out), "--model.baseline", "unk"])
    assert code == 1
    # The same config is accepted (a resume) and --overwrite discards the old run.
    run = _bench(out, "--methods", '["random"]', "--max_examples", "4", "--overwrite", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(_rows(out)) == 4


def test_every_config_parses():
    from concurrent.futures import ThreadPoolExecutor

    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs

    def parse(path: Path) -> subprocess.CompletedProcess:
        yaml.safe_load(path.read_text())
        command = "bench" if path.parent.name == "bench" else "train"
        return subprocess.run([*TOKATTR, command, "--config", str(path), "--print_config"],
                              capture_output=True, text=True, env=_env(), cwd=ROOT)  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:  # one process per core: half the wait
        runs = list(pool.map(parse, configs))
    for path, run in zip(configs, runs, strict=True):
        assert run.returncode == 0, (path, run.stderr[-2000:])
        assert "model:" in run.stdout


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out_dir", "--max_examples", "--methods", "--overwrite", "--n_bootstrap",
                   "--retry_errors",
                   "--trainer.accelerator", "--trainer.devices", "--trainer.strategy",
                   "--trainer.precision", "--trainer.num_nodes", "--model.model",
                   "--model.methods", "--model.metrics", "--model.metric_params",
                   "--model.baseline", "--model.forward_batch_size", "--data.jsonl",
                   "--data.seed", "--data.n", "--data.mix", "--data.demonstrations",
                   "--data.batch_size", "--config", "--print_config"):  # fmt: skip
        assert option in text, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.jsonl", "/no/such/file.jsonl"], "no such file"),
        (["--data.jsonl", "EMPTY"], "empty"),
        (["--methods", '["integrated_gradient"]'], "unknown method"),
        (["--model.metrics", '["comprehensivenes"]'], "unknown metric"),
        (["--trainer.devices", "64"], "this machine has"),
        (["--model.target_fn", "contrast"], "needs foils"),
        (["--model.target_fn", "log_probs"], "unknown target_fn"),
        (["--model.model", "/no/such/model"], "no model folder"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, capsys, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    code = main(["bench", "--config", str(ROOT / "configs/bench/quick.yaml"),
                 "--out_dir", str(out), *args])  # fmt: skip
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (out / "parts").exists()


def test_features_and_sources_reach_the_rows_and_the_report(tmp_path):
    """A JSONL file with features and sources, and the lookup generator's definitions: rows
    score features, carry their spans and sources, and the metrics are computed on them."""
    data = tmp_path / "ctx.jsonl"
    lines = [
        {"id": "a", "prompt": "9 + 3 = 12;7 x 5 =", "answer": "35", "features": "separator:;",
         "sources": [1]},
        {"id": "b", "prompt": "1+1=2;4+4=8;2 x 3 =", "answer": "6", "features": [[0, 5], [12, 19]],
         "sources": [1]},
    ]  # fmt: skip
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    common = [
        *TOKATTR, "bench", "--config", str(ROOT / "configs/bench/quick.yaml"),
        "--model.methods", json.dumps({"occlusion": {}, "context_cite": {"n_ablations": 8},
                                       "random": {}}),
        "--model.metrics", json.dumps(["comprehensiveness", "lds", "plausibility_top1"]),
    ]  # fmt: skip
    out = tmp_path / "jsonl"
    run = _run([*common, "--data.jsonl", str(data), "--out_dir", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["example_id"], r["method"]): r for r in _rows(out)}
    a, b = rows[("a", "occlusion")], rows[("b", "occlusion")]
    assert a["features"] == ["9 + 3 = 12", "7 x 5 ="] and a["spans"] == [[0, 10], [11, 18]]
    assert b["features"] == ["1+1=2", "2 x 3 ="] and len(b["scores"]) == 2
    assert a["sources"] == [1] and -1 in b["token_features"]
    assert set(a["metrics"]) >= {"lds", "plausibility_top1", "comprehensiveness"}
    assert a["metrics"]["plausibility_top1"] == float(abs(a["scores"][1]) > abs(a["scores"][0]))
    assert (out / "report.html").is_file()
    # The lookup generator: each definition a feature, the queried one the source.
    out = tmp_path / "lookup"
    run = _run([*common, "--data.dataset", "lookup", "--data.pairs", "[3, 4]", "--data.n", "4",
                "--data.length", "[30, 40]", "--data.filler", "[4, 8]",
                "--out_dir", str(out)])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for r in _rows(out):
        definitions = [f for f in r["features"] if f[0].isalpha() and f[1:].isdigit()]
        filler = [f for f in r["features"] if f.isdigit()]
        assert len(definitions) in (3, 4) and filler  # the filler passages are features too
        assert len(definitions) + len(filler) == len(r["features"])
        (src,) = r["sources"]
        assert r["features"][src] in definitions
