"""Result rows and the run identity are typed: frozen dataclasses that survive a JSON round
trip, refuse what they do not describe, and are read back without any model code."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tokattr.results import RowWriter, check_run, iter_rows
from tokattr.rows import ResultRow, RunIdentity
from tokattr.table import EvaluationTable, MetricRow

ROW = ResultRow(
    example_id="e1",
    method="occlusion",
    prompt="12+3=",
    answer="15",
    answer_ids=[7, 9],
    tokens=["1", "2", "+", "3", "="],
    scores=[0.5, -0.25, 0.0, 1.0, 0.125],
    labels=["operand"] * 5,
    time_ms=3.5,
    model_evals=6,
    metrics={"deletion_auc": 0.25, "comprehensiveness": [0.1, math.nan], "infidelity": math.nan},
    curves={"deletion": [1.0, 0.5], "insertion": [0.0, 1.0]},
)


def test_a_row_survives_the_file_and_nan_is_null(tmp_path):
    writer = RowWriter(tmp_path / "rows.jsonl")
    writer.write([ROW, ResultRow("e2", "random", "p", None, error="why")])
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert lines[0]["metrics"]["infidelity"] is None
    assert lines[0]["metrics"]["comprehensiveness"] == [0.1, None]
    assert "error" not in lines[0] and lines[1]["error"] == "why"
    back = list(iter_rows(tmp_path / "rows.jsonl"))
    assert back[0] == ResultRow.from_json(ROW.to_json())
    assert back[0].scores == ROW.scores and back[0].key == ("e1", "occlusion") and back[0].ok
    assert not back[1].ok and back[1].scores is None


def test_a_row_with_unknown_or_missing_fields_is_refused_with_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        ResultRow.from_json(ROW.to_json() | {"colour": 1})
    with pytest.raises(ValueError, match="without"), RowWriter(tmp_path / "w.jsonl") as w:
        w.write([{"example_id": "a", "method": "m"}])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROW.to_json()) + "\n" + json.dumps({"method": "m"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: result row without"):
        list(iter_rows(path))


def _identity(**change):
    values = dict(
        model="arith-tiny", weights="abc", dtype="None", examples=[["e1", "1+1=", "2"]],
        methods={"occlusion": {}}, metrics=["deletion_auc"], metric_params={},
        baseline="pad", target_fn="log_prob", shapley_max_tokens=16, randomization_seed=0,
    )  # fmt: skip
    return RunIdentity(**(values | change))


def test_the_run_identity_names_what_changed(tmp_path):
    check_run(tmp_path, _identity(), overwrite=False)
    assert RunIdentity.from_json(json.loads((tmp_path / "run.json").read_text())) == _identity()
    check_run(tmp_path, _identity(), overwrite=False)  # the same run resumes
    with pytest.raises(ValueError, match="changed: baseline, methods"):
        check_run(tmp_path, _identity(baseline="zero", methods={"random": {}}), overwrite=False)
    (tmp_path / "run.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="does not describe a run"):
        check_run(tmp_path, _identity(), overwrite=False)
    check_run(tmp_path, _identity(), overwrite=True)
    # A run of the metrics' earlier meanings (its run.json has no metrics_version) is not
    # resumed into the new ones; one of another version names the field.
    old = _identity().to_json()
    del old["metrics_version"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"missing \['metrics_version'\]"):
        check_run(tmp_path, _identity(), overwrite=False)
    check_run(tmp_path, _identity(metrics_version=1), overwrite=True)
    with pytest.raises(ValueError, match="changed: metrics_version"):
        check_run(tmp_path, _identity(), overwrite=False)


def test_reading_rows_imports_no_model_code(tmp_path):
    with RowWriter(tmp_path / "rows.jsonl") as w:
        w.write([ROW])
    code = (
        "import sys; from tokattr.results import iter_rows; "
        f"rows = list(iter_rows({str(tmp_path / 'rows.jsonl')!r})); assert rows[0].ok; "
        "bad = [m for m in ('transformers', 'captum', 'torchmetrics', 'tokattr.attribution', "
        "'tokattr.methods', 'lightning', 'wandb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reading_a_finished_run_and_its_report_numbers_imports_no_model_code(tmp_path):
    with RowWriter(tmp_path / "attributions.jsonl") as w:
        w.write([ROW, ResultRow("e1", "random", "12+3=", "15", error="why")])
    EvaluationTable(
        rows=[MetricRow("occlusion", "deletion_auc", "", 0.25, 0.1, 0.4, False, 1)],
        values={},
        attributions={},
    ).to_csv(tmp_path / "metrics.csv")
    code = (
        "import sys; from tokattr.report import load_run, method_costs, mean_erasure_curves; "
        f"run = load_run({str(tmp_path)!r}); c = method_costs(run); "
        "assert [x.examples for x in c] == [1, 0] and [x.errors for x in c] == [0, 1], c; "
        "assert run.errors()[0].error == 'why'; assert 'occlusion' in mean_erasure_curves(run); "
        "assert run.table.get('occlusion', 'deletion_auc').mean == 0.25; "
        "bad = [m for m in ('transformers', 'captum', 'torchmetrics', 'tokattr.attribution', "
        "'tokattr.methods', 'tokattr.metrics.classes', 'lightning', 'wandb') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
