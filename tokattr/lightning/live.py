"""Live progress of a benchmark run, handed to every Lightning logger as batches finish.

Lightning does not allow ``self.log`` in ``predict_step``, so the numbers go to the trainer's
loggers directly (``logger.log_metrics(metrics, step)``): a ``CSVLogger``, a
``TensorBoardLogger`` or the run's ``WandbLogger`` alike. Rank zero reads what *every* rank
has written so far: each rank appends its rows to ``out_dir/parts/rank{r}.jsonl`` and syncs
the file after every batch (:class:`~tokattr.lightning.runner.ResultWriter`), so the union of
the part files is the run's progress, read without a collective call. (A collective per batch
would have to run the same number of times on every rank, and ranks with fewer batches left,
say after a resume, would deadlock it.) Rank zero lags the others by at most the batch they
are writing.

The step is the number of (example, method) rows done, counted over the whole ``out_dir``,
rows of earlier (resumed) runs included, so it only grows, across resumes too.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

LIVE_PREFIX = "live"
"""Every live key starts with this, then ``/<method>/<quantity>`` or ``/<quantity>``."""


class _MethodStats:
    def __init__(self) -> None:
        self.done = 0
        self.errors = 0
        self.ms = 0.0
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, row: dict[str, Any]) -> None:
        self.done += 1
        if row.get("error") is not None:
            self.errors += 1
            return
        self.ms += float(row.get("time_ms") or 0.0)
        for name, value in (row.get("metrics") or {}).items():
            if isinstance(value, list):  # one value per k: their mean, the AOPC
                finite = [float(v) for v in value if isinstance(v, int | float)
                          and math.isfinite(v)]  # fmt: skip
                value = sum(finite) / len(finite) if finite else float("nan")
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.sums[name] += float(value)
                self.counts[name] += 1


class LiveProgress(Callback):
    """Logs, after each predict batch of rank zero, per method: ``examples`` done, ``errors``,
    ``seconds_per_example`` (the method's own time) and the running mean of every metric
    (of a per-k metric, its AOPC: the mean over k, as in ``metrics.csv``); and
    ``examples_done`` / ``fraction_done`` of the whole run.

    Args:
        out_dir: the run's folder (its ``parts/`` are read).
        total: (example, method) rows the complete run has.
    """

    def __init__(self, out_dir: str | Path, total: int) -> None:
        self.out_dir = Path(out_dir)
        self.total = total
        self._offsets: dict[Path, int] = {}
        self._keys: set[tuple[str, str]] = set()
        self._stats: dict[str, _MethodStats] = defaultdict(_MethodStats)
        self._logged = -1

    def read(self) -> int:
        """Read the rows added to the part files since the last call; the rows done."""
        for path in sorted((self.out_dir / "parts").glob("rank*.jsonl")):
            start = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(start)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only: a rank may be mid-write
            self._offsets[path] = start + end
            for line in chunk[:end].splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                key = (str(row.get("example_id")), str(row.get("method")))
                if key in self._keys:
                    continue  # a retried error row: counted once
                self._keys.add(key)
                self._stats[key[1]].add(row)
        return len(self._keys)

    def metrics(self) -> dict[str, float]:
        """The live numbers, as logged."""
        done = len(self._keys)
        out = {
            f"{LIVE_PREFIX}/examples_done": float(done),
            f"{LIVE_PREFIX}/fraction_done": done / self.total if self.total else 1.0,
        }
        for method, s in sorted(self._stats.items()):
            p = f"{LIVE_PREFIX}/{method}"
            out[f"{p}/examples"] = float(s.done)
            out[f"{p}/errors"] = float(s.errors)
            ok = s.done - s.errors
            if ok:
                out[f"{p}/seconds_per_example"] = s.ms / 1000 / ok
            for name, total in s.sums.items():
                out[f"{p}/{name}"] = total / s.counts[name]
        return out

    def publish(self, trainer: pl.Trainer) -> None:
        """Read the part files and hand the numbers to every logger, if rows were added."""
        if not trainer.is_global_zero or not trainer.loggers:
            return
        step = self.read()
        if step == self._logged:
            return
        self._logged = step
        values = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            logger.save()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx=0) -> None:  # fmt: skip
        # Callbacks run in order: ResultWriter (first in the list) has written this batch.
        self.publish(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer)
