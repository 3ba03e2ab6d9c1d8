"""A finished run read back from its ``out_dir``, and the numbers per method drawn from it.

:func:`load_run` reads ``attributions.jsonl`` and ``metrics.csv`` (and ``metric_sanity.csv``,
``run.json`` and ``config.yaml`` when present) into a frozen :class:`Run`;
:func:`headline_metrics` picks the one-number-per-metric columns; :func:`method_costs` a
run's cost per method (:func:`tokattr.results.method_costs`, shared with ``summary.md``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokattr.results import Cost
from tokattr.results import method_costs as costs_of_rows
from tokattr.rows import ResultRow
from tokattr.sanity import MetricCheck, Separation, metric_checks, read_sanity_csv
from tokattr.table import CSV_COLUMNS, EvaluationTable, MetricRow

HEADLINE_K = ("", "aopc")  # one number per metric: plain metrics, and the ERASER AOPC


@dataclass(frozen=True)
class Run:
    """A finished benchmark run, as read from its ``out_dir``.

    ``rows`` are the rows of ``attributions.jsonl`` (one per (example, method), see
    :mod:`tokattr.lightning.runner`); ``metrics`` the rows of ``metrics.csv``; ``methods`` and
    ``example_ids`` in the order of the run; ``info`` the parsed ``run.json`` and
    ``config`` / ``config_text`` the ``config.yaml`` of the command, when present.
    """

    out_dir: Path
    rows: tuple[ResultRow, ...]
    metrics: tuple[MetricRow, ...]
    methods: tuple[str, ...]
    example_ids: tuple[str, ...]
    info: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    config_text: str | None = None
    sanity: tuple[Separation, ...] = ()  # metric_sanity.csv, where the run has the control
    _by_key: dict[tuple[str, str], ResultRow] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[tuple[str, str], ResultRow] = {}
        for r in self.rows:
            key = r.key
            if key in by_key:
                raise ValueError(f"{self.out_dir}: (example, method) {key} appears twice")
            by_key[key] = r
        object.__setattr__(self, "_by_key", by_key)  # frozen: the index is set once, here

    def row(self, example_id: str, method: str) -> ResultRow | None:
        """The row of ``(example_id, method)``, or None."""
        return self._by_key.get((str(example_id), method))

    @property
    def table(self) -> EvaluationTable:
        """``metrics`` as an :class:`~tokattr.table.EvaluationTable` (no per-example
        values: those stay in ``rows``), for its ``get`` and ``to_markdown``."""
        return EvaluationTable(
            rows=list(self.metrics), values={}, attributions={}, sanity=list(self.sanity)
        )

    @property
    def checks(self) -> list[MetricCheck]:
        """One check per metric (:func:`tokattr.sanity.metric_checks`), empty without a
        ``metric_sanity.csv``."""
        return metric_checks(self.metrics, self.sanity) if self.sanity else []

    def errors(self) -> list[ResultRow]:
        """The rows of (example, method) pairs the method could not score."""
        return [r for r in self.rows if not r.ok]


def load_run(out_dir: str | Path) -> Run:
    """Read a finished run's ``out_dir``.

    Raises:
        FileNotFoundError: no such folder, or ``attributions.jsonl`` / ``metrics.csv`` missing
            (a run that has not finished, or not been merged).
        ValueError: a malformed line or column, or a repeated (example, method) pair.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no such run folder: {out}")
    for name in ("attributions.jsonl", "metrics.csv"):
        if not (out / name).is_file():
            unfinished = any((out / "parts").glob("rank*.jsonl"))
            raise FileNotFoundError(
                f"{out / name}: no such file; {out} is not a finished `tokattr bench` run"
                + (
                    " (it has partial results: run the same command again to finish and merge)"
                    if unfinished
                    else ""
                )
            )
    rows = _read_rows(out / "attributions.jsonl")
    metrics = _read_metrics(out / "metrics.csv")
    methods = dict.fromkeys(r.method for r in rows)
    methods.update(dict.fromkeys(m.method for m in metrics))  # a method with no rows left
    sanity_file = out / "metric_sanity.csv"
    sanity = tuple(read_sanity_csv(sanity_file)) if sanity_file.is_file() else ()
    config_file, info_file = out / "config.yaml", out / "run.json"
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    return Run(
        out_dir=out,
        rows=tuple(rows),
        metrics=tuple(metrics),
        methods=tuple(methods),
        example_ids=tuple(dict.fromkeys(r.example_id for r in rows)),
        info=json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else None,
        config=yaml.safe_load(config_text) if config_text is not None else None,
        config_text=config_text,
        sanity=sanity,
    )


def _read_rows(path: Path) -> list[ResultRow]:
    # The merged file is written whole and renamed into place, so a bad line is an error here
    # (unlike the part files, where a killed run may leave one).
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(ResultRow.from_json(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not JSON ({e})") from e
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {i}: {e}") from e
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _read_metrics(path: Path) -> list[MetricRow]:
    with path.open(newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f), None)  # None: an empty file
    if tuple(columns or ()) != CSV_COLUMNS:
        raise ValueError(f"{path}: columns {columns}, expected {list(CSV_COLUMNS)}")
    return EvaluationTable.from_csv(path).rows


def headline_metrics(run: Run) -> list[tuple[str, str, bool]]:
    """The table's columns: ``(metric, k, higher_is_better)`` with ``k`` ``""`` or ``"aopc"``,
    in the order of ``metrics.csv``."""
    return list(
        dict.fromkeys((r.metric, r.k, r.higher_is_better) for r in run.metrics if r.k in HEADLINE_K)
    )


def method_costs(run: Run) -> list[Cost]:
    """A run's cost per method (:func:`tokattr.results.method_costs` of its rows)."""
    return costs_of_rows(run.rows, run.methods)
