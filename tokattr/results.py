"""Results on disk: one JSON line per (example, method), written as produced, merged at the end.

Layout of a run's ``out_dir``:

- ``parts/rank{r}.jsonl`` — rows as each process produces them (flushed per batch). A run
  killed at any moment leaves at most one partial last line per file, which is cut off when
  the file is opened again and skipped when read.
- ``attributions.jsonl`` — the merged rows, one per (example, method), in data-set order.
- ``metrics.csv`` — ``method, metric, k, mean, ci_low, ci_high, higher_is_better, n``.
- ``metric_sanity.csv`` — ``metric, method, effect, ci_low, ci_high, discriminates``: each
  method against the ``random`` control (:mod:`tokattr.sanity`).
- ``summary.md`` — the method x metric table, the metric checks and the cost per method.
- ``run.json`` — what identifies the run (model and a hash of its weights and tokenizer,
  data, methods, metrics, …); a resumed run must match it.
- ``.lock`` — locked (``flock``) while a run works on ``out_dir``, with its pid and host: a
  second run on the same ``out_dir`` is refused; a killed run's lock is gone with it.

No Lightning here: the runner and plain Python share these functions.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tokattr.rows import ResultRow, RunIdentity
from tokattr.sanity import sanity_markdown, write_sanity_csv
from tokattr.table import EvaluationTable, table_from_values


class RowWriter:
    """Appends rows to a JSONL file, one flushed line per row; reopening a file that ends in a
    partial line (a killed run) cuts that line off first."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_partial_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, rows: Iterable[ResultRow | Mapping[str, Any]]) -> None:
        """Append ``rows`` (a mapping is checked as a :class:`ResultRow` first)."""
        for row in rows:
            if not isinstance(row, ResultRow):
                row = ResultRow.from_json(dict(row))
            self._file.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_partial_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def iter_rows(path: str | Path) -> Iterator[ResultRow]:
    """The complete rows of one JSONL file (a partial or corrupt line is skipped).

    Raises:
        ValueError: a line that is JSON but not a result row (``file:line`` named).
    """
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # the partial last line of a killed run
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            try:
                yield ResultRow.from_json(data)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None


def part_files(out_dir: str | Path) -> list[Path]:
    return sorted((Path(out_dir) / "parts").glob("rank*.jsonl"))


def read_parts(out_dir: str | Path) -> dict[tuple[str, str], ResultRow]:
    """Every complete row written so far, by ``(example_id, method)``: the first one, except
    that a scored row replaces an error row (one retried with ``--retry_errors``)."""
    rows: dict[tuple[str, str], ResultRow] = {}
    for path in part_files(out_dir):
        for row in iter_rows(path):
            old = rows.get(row.key)
            if old is None or (not old.ok and row.ok):
                rows[row.key] = row
    return rows


class OutDirBusyError(RuntimeError):
    """Another run holds the ``out_dir``."""


class OutDirLock:
    """``out_dir/.lock`` held while a run works there, so that two runs never compute the
    same pairs: an exclusive ``flock`` on the file (released by the kernel when the process
    ends, however it ends: a killed run leaves no stale lock), and the owner's pid, host and
    start time written in it for the message a second run gets. The file stays (removing a
    file others may be opening would let two runs hold two different files).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self._file: Any = None

    def owner(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock, or ``None`` if nobody wrote it."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock. Raises :class:`OutDirBusyError` if another live run holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            owner = self.owner()
            who = (
                f"pid {owner.get('pid')} on {owner.get('host')}, since "
                + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
                if owner
                else "a run that is starting"
            )
            raise OutDirBusyError(
                f"{self.path.parent} is in use by another run ({who}); wait for it to finish "
                "or use another --out_dir"
            ) from None
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            self._file.seek(0)
            self._file.truncate()  # nobody holds it now
            self._file.flush()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> OutDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_run(out_dir: str | Path, identity: RunIdentity, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that holds results of a different run (unless ``overwrite``, which
    deletes them); record ``identity`` for the next resume."""
    out = Path(out_dir)
    run_file = out / "run.json"
    if run_file.exists() and not overwrite:
        try:
            changed = identity.changed(RunIdentity.from_json(json.loads(run_file.read_text())))
        except ValueError as e:
            changed = [f"run.json ({e})"]
        if changed:
            raise ValueError(
                f"{out} holds results of a different run (changed: {', '.join(changed)}); "
                "use another --out_dir, or --overwrite to discard them"
            )
    if overwrite:
        for path in [*part_files(out), *(out / n for n in OUTPUTS)]:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity.to_json(), indent=1, sort_keys=True) + "\n")


OUTPUTS = ("attributions.jsonl", "metrics.csv", "metric_sanity.csv", "summary.md")


def merge(
    out_dir: str | Path,
    example_ids: Sequence[str],
    methods: Sequence[str],
    metric_params: Mapping[str, Mapping[str, object]] | None = None,
    n_bootstrap: int = 1000,
) -> EvaluationTable:
    """Merge the part files into ``attributions.jsonl`` (data-set order, then method order),
    and write ``metrics.csv``, ``metric_sanity.csv`` and ``summary.md``.

    Raises:
        RuntimeError: a (example, method) pair of the data set has no row (a gap).
    """
    out = Path(out_dir)
    rows = read_parts(out)
    missing = [(e, m) for e in example_ids for m in methods if (e, m) not in rows]
    if missing:
        raise RuntimeError(
            f"{len(missing)} (example, method) pairs have no result, e.g. {missing[:3]}; run "
            "the same command again to finish them"
        )
    ordered = [rows[(e, m)] for e in example_ids for m in methods]
    tmp = out / "attributions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in ordered:
            f.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(out / "attributions.jsonl")

    # One value per example of the data set for every (method, metric), NaN where a method
    # has no value (an error row): the examples stay aligned across methods, so the metric
    # checks compare each method with the control on the same examples.
    widths: dict[str, int] = {}
    for row in ordered:
        for name, v in row.metrics.items():
            widths.setdefault(name, len(v) if isinstance(v, list) else 0)
    stacked: dict[tuple[str, str], torch.Tensor] = {}
    for m in methods:
        for name, width in widths.items():
            if not any(name in rows[(e, m)].metrics for e in example_ids):
                continue  # a metric that does not apply to the method
            column = []
            for e in example_ids:
                v = rows[(e, m)].metrics.get(name)
                if v is None:
                    column.append(torch.full((width,) if width else (), math.nan))
                    continue
                x = [math.nan if y is None else y for y in (v if width else [v])]
                t = torch.tensor(x, dtype=torch.float64)
                column.append(t if width else t[0])
            stacked[(m, name)] = torch.stack(column).double()
    table = table_from_values(stacked, metric_params, n_bootstrap)
    table.to_csv(out / "metrics.csv")
    write_sanity_csv(out / "metric_sanity.csv", table.sanity)
    cost = cost_markdown(ordered, methods)
    parts = [table.to_markdown()]
    if table.sanity:
        parts.append(sanity_markdown(table.checks, table.sanity))
    parts.append(cost)
    (out / "summary.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return table


def error_summary(rows: Sequence[ResultRow], limit: int = 5) -> str:
    """A few lines on the error rows (which example, which method, why), or ``""``."""
    errors = [r for r in rows if not r.ok]
    if not errors:
        return ""
    lines = [f"{len(errors)} (example, method) pairs have no scores (error rows):"]
    for r in errors[:limit]:
        lines.append(f"- {r.example_id} / {r.method}: {r.error}")
    if len(errors) > limit:
        lines.append(f"- … and {len(errors) - limit} more (see attributions.jsonl, 'error')")
    lines.append("A rerun keeps them; add --retry_errors true to compute them again.")
    return "\n".join(lines)


class Cost(NamedTuple):
    """A method's own cost over the run (the metrics' model calls are not counted)."""

    method: str
    examples: int  # scored
    errors: int
    time_s: float  # total attribution time
    ms_per_example: float
    evals_per_example: float  # model evaluations


def method_costs(rows: Sequence[ResultRow], methods: Sequence[str]) -> list[Cost]:
    """Per method of ``methods``, in that order: examples scored, errors, time and model
    evaluations. Error rows count as errors only, not in the means. The one place a method's
    cost is added up (``summary.md``, the report, W&B)."""
    out = []
    for m in methods:
        mine = [r for r in rows if r.method == m]
        scored = [r for r in mine if r.ok]
        n = max(len(scored), 1)
        total_ms = sum(r.time_ms for r in scored)
        evals = sum(r.model_evals for r in scored)
        out.append(
            Cost(m, len(scored), len(mine) - len(scored), total_ms / 1000, total_ms / n, evals / n)
        )
    return out


def cost_markdown(rows: Sequence[ResultRow], methods: Sequence[str]) -> str:
    """The cost table of :func:`method_costs`, as markdown."""
    lines = [
        "| method | examples | errors | time (s) | ms / example | model evals / example |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c.method} | {c.examples} | {c.errors} | {c.time_s:.1f} | {c.ms_per_example:.1f} | "
        f"{c.evals_per_example:.0f} |"
        for c in method_costs(rows, methods)
    ]
    return "\n".join(lines)
