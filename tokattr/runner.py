"""The benchmark runner (Lightning layer): every method and metric over a prompt set, sharded
over processes, each (example, method) pair computed once, results written as produced.

- :class:`PromptDataModule` — the examples (arithmetic generator settings or a JSONL file),
  minus those already finished in ``out_dir``; ``trainer.predict`` shards them with an
  unrepeated sampler, so no example is computed twice (``trainer.test`` would repeat some).
- :class:`AttributionModule` — the model; ``predict_step`` runs every method and metric on a
  batch (:func:`tokattr.evaluation.score_batch`) and returns rows.
- :class:`ResultWriter` — appends each batch's rows to ``out_dir/parts/rank{r}.jsonl``.
- :class:`ExamplesPerSecond` — the progress bar, with examples/s.

Random methods and random perturbations seed from the example id (not the rank), so one
process and N processes give the same numbers.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader

from tokattr.attribution import BASELINES, DEFAULT_BATCH_SIZE, build_method
from tokattr.batching import encode_example
from tokattr.data.arithmetic import DEFAULT_MIX, ArithmeticGenerator, read_jsonl
from tokattr.data.labels import token_roles
from tokattr.evaluation import score_batch
from tokattr.methods import METHODS
from tokattr.metrics import APPLIES_TO, METRICS
from tokattr.models import load_model, reinitialised
from tokattr.results import RowWriter, read_parts


def example_seed(example_id: str) -> int:
    """The seed of an example's random draws: a stable hash of its id (CRC-32), the same on
    every rank and in every run."""
    return zlib.crc32(str(example_id).encode())


class PromptDataModule(pl.LightningDataModule):
    """Prompts for the benchmark: fresh arithmetic problems, or a JSONL file.

    Args:
        jsonl: a file of ``{"id", "prompt", "answer"}`` lines (``answer`` may be left out for
            arithmetic prompts); ``None``: the arithmetic generator.
        seed: the generator's seed (use one not used in training; the bundled model was
            trained on seeds 0 and 1).
        n: problems drawn from the generator.
        mix: bucket -> weight for the generator (default: every bucket).
        demonstrations: ``[lo, hi]`` solved demonstrations placed before each query.
        batch_size: examples per batch (per process).
        max_examples: keep only the first N examples.
    """

    def __init__(
        self,
        jsonl: str | None = None,
        seed: int = 4242,
        n: int = 100,
        mix: dict[str, float] | None = None,
        demonstrations: tuple[int, int] = (0, 0),
        batch_size: int = 16,
        max_examples: int | None = None,
    ) -> None:
        super().__init__()
        if n < 1 or batch_size < 1 or (max_examples is not None and max_examples < 1):
            raise ValueError(
                f"data: n, batch_size and max_examples must be >= 1, got n={n}, "
                f"batch_size={batch_size}, max_examples={max_examples}"
            )
        self.jsonl, self.seed, self.n = jsonl, seed, n
        self.mix = dict(mix) if mix is not None else dict(DEFAULT_MIX)
        self.demonstrations = tuple(demonstrations)
        self.batch_size, self.max_examples = batch_size, max_examples
        self.skip: set[str] = set()  # example ids already finished for every method
        self._examples: list[dict[str, Any]] | None = None

    def examples(self) -> list[dict[str, Any]]:
        """Every example of the data set: ``{"example_id", "prompt", "answer"}``.

        Raises:
            FileNotFoundError: the JSONL file does not exist.
            ValueError: the data set is empty, or a line is malformed.
        """
        if self._examples is None:
            if self.jsonl is not None:
                if not Path(self.jsonl).is_file():
                    raise FileNotFoundError(f"data.jsonl: no such file: {self.jsonl}")
                problems = read_jsonl(self.jsonl)
            else:
                gen = ArithmeticGenerator(
                    seed=self.seed, mix=self.mix, demonstrations=self.demonstrations
                )
                problems = [gen.problem(i) for i in range(self.n)]
            if self.max_examples is not None:
                problems = problems[: self.max_examples]
            if not problems:
                raise ValueError(f"the data set is empty ({self.jsonl or 'generator'})")
            ids = [str(p.id) for p in problems]
            if len(set(ids)) != len(ids):
                raise ValueError("example ids must be unique in the data set")
            self._examples = [
                {"example_id": str(p.id), "prompt": p.prompt, "answer": p.answer, "roles": p.roles}
                for p in problems
            ]
        return self._examples

    def chunks(self) -> list[list[dict[str, Any]]]:
        """The batches, fixed by position in the data set (batch i = examples ``[i*bs,
        (i+1)*bs)``) whatever the number of processes or what is already done, so that every
        example is computed in the same company, and gets the same numbers, in a 1-process,
        an N-process and a resumed run."""
        ex = self.examples()
        return [ex[i : i + self.batch_size] for i in range(0, len(ex), self.batch_size)]

    def predict_dataloader(self) -> DataLoader:
        # Batches with something left to do; the (distributed, unrepeated) sampler deals out
        # whole batches.
        todo = [c for c in self.chunks() if any(e["example_id"] not in self.skip for e in c)]
        return DataLoader(todo, batch_size=None, shuffle=False, collate_fn=_as_is)


def _as_is(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class AttributionModule(pl.LightningModule):
    """Runs every method and metric on each batch of examples.

    Args:
        model: ``"arith-tiny"``, a local folder or a hub id (:func:`tokattr.load_model`).
        methods: method -> hyper-parameters (``{}`` for the defaults); ``None``: every method.
        metrics: metric names; ``None``: every metric.
        metric_params: metric -> parameters, e.g. ``{"infidelity": {"n_perturb_samples": 32}}``.
        baseline: how a token is removed: ``pad``, ``unk`` or ``zero``.
        target_fn: ``log_prob``, ``prob`` or ``logit``.
        forward_batch_size: the most sequences in one forward pass.
        shapley_max_tokens: ``shapley_error`` (and ``exact_shapley``) only on prompts with at
            most this many tokens; longer prompts get no value (and exact_shapley an error row).
        randomization_seed: seed of the re-initialised model of ``randomization_spearman``.
        dtype: the model's dtype (``float32``, ``bfloat16``, …); ``None``: as saved.
    """

    def __init__(
        self,
        model: str = "arith-tiny",
        methods: dict[str, dict[str, Any]] | None = None,
        metrics: list[str] | None = None,
        metric_params: dict[str, dict[str, Any]] | None = None,
        baseline: str = "pad",
        target_fn: str = "log_prob",
        forward_batch_size: int = DEFAULT_BATCH_SIZE,
        shapley_max_tokens: int = 16,
        randomization_seed: int = 0,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.methods = {m: {} for m in METHODS} if methods is None else dict(methods)
        if not self.methods:
            raise ValueError("model.methods: no methods given")
        for name, params in self.methods.items():
            build_method(name, dict(params or {}))  # refuses unknown methods / parameters
        self.metric_names = list(METRICS) if metrics is None else list(metrics)
        unknown = sorted(set(self.metric_names) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
        self.metric_params = dict(metric_params or {})
        for name, params in self.metric_params.items():
            if name not in METRICS:
                raise ValueError(f"metric_params for unknown metric {name!r}")
            METRICS[name](**params)
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
        if target_fn == "contrast":
            raise ValueError("target_fn='contrast' needs foils, which the runner does not take")
        self.baseline, self.target_fn = baseline, target_fn
        self.forward_batch_size = forward_batch_size
        self.shapley_max_tokens, self.randomization_seed = shapley_max_tokens, randomization_seed
        self.lm = load_model(model, dtype=dtype)
        self.model_name = model
        self.net = self.lm.model  # a submodule, so that Lightning moves it to the device
        self.random_lm = (
            reinitialised(self.lm, randomization_seed)
            if "randomization_spearman" in self.metric_names
            else None
        )
        self.random_net = None if self.random_lm is None else self.random_lm.model
        self.done: set[tuple[str, str]] = set()  # (example_id, method) pairs already on disk

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        answers = self._answers(batch)
        exact: dict[tuple[str, ...], torch.Tensor] = {}  # shared by the SHAP estimators
        for method, params in self.methods.items():
            missing = {e["example_id"] for e in batch} - {e for e, m in self.done if m == method}
            if not missing:
                continue
            # The whole batch, so each example keeps its batch-mates (and its numbers); only
            # the rows not on disk yet are written.
            new = self._score(method, params or {}, batch, answers, exact)
            rows += [r for r in new if r["example_id"] in missing]
        return rows

    def _answers(self, batch: list[dict[str, Any]]) -> list[str]:
        missing = [i for i, e in enumerate(batch) if not e.get("answer")]
        answers = [e.get("answer") or "" for e in batch]
        if missing:
            from tokattr.accuracy import greedy_answers

            for i, a in zip(missing, greedy_answers(self.lm, [batch[i]["prompt"] for i in missing]),
                            strict=True):  # fmt: skip
                answers[i] = a
        return answers

    def _score(self, method, params, examples, answers, exact_cache) -> list[dict[str, Any]]:
        lm = self.lm
        ok, rows = [], []
        for e, a in zip(examples, answers, strict=True):
            try:
                enc = encode_example(lm.tokenizer, e["prompt"], a, None, lm.max_length)
            except ValueError as err:
                rows.append(self._error_row(e, a, method, err))
                continue
            if method == "exact_shapley" and _n_features(enc) > params.get(
                "max_tokens", self.shapley_max_tokens
            ):
                rows.append(self._error_row(e, a, method, "too many tokens for exact Shapley"))
                continue
            ok.append((e, a, enc))
        if not ok:
            return rows
        metrics = [n for n in self.metric_names if method in APPLIES_TO.get(n, {method})]
        key = tuple(e["example_id"] for e, _, _ in ok)
        scored = score_batch(
            lm,
            [enc for _, _, enc in ok],
            [e["prompt"] for e, _, _ in ok],
            [a for _, a, _ in ok],
            [example_seed(e["example_id"]) for e, _, _ in ok],
            method,
            params,
            metrics,
            self.metric_params,
            baseline=self.baseline,
            target_fn=self.target_fn,
            batch_size=self.forward_batch_size,
            random_model=self.random_lm,
            shapley_max_tokens=self.shapley_max_tokens,
            exact=exact_cache.get(key),
        )
        if scored.exact is not None:
            exact_cache[key] = scored.exact
        for j, ((e, a, _), attr) in enumerate(zip(ok, scored.attributions, strict=True)):
            labels = (
                token_roles(attr.offsets, e["prompt"], e["roles"])
                if e.get("roles") is not None
                else None
            )
            rows.append(
                {
                    "example_id": e["example_id"],
                    "method": method,
                    "prompt": e["prompt"],
                    "answer": a,
                    "tokens": attr.tokens,
                    "scores": attr.scores.tolist(),
                    "labels": labels,
                    "time_ms": attr.time_ms,
                    "model_evals": attr.model_evals,
                    "metrics": {n: v[j].tolist() for n, v in scored.values.items()},
                    "curves": None if scored.curves is None else scored.curves[j],
                }
            )
        return rows

    def _error_row(self, e, answer, method, err) -> dict[str, Any]:
        return {
            "example_id": e["example_id"],
            "method": method,
            "prompt": e["prompt"],
            "answer": answer,
            "tokens": None,
            "scores": None,
            "labels": None,
            "time_ms": 0.0,
            "model_evals": 0,
            "metrics": {},
            "curves": None,
            "error": str(err),
        }


def _n_features(enc) -> int:
    return sum(not s for s in enc.special)


class ResultWriter(BasePredictionWriter):
    """Appends each batch's rows to ``out_dir/parts/rank{global_rank}.jsonl`` as soon as the
    batch is done (flushed and synced), so a killed run loses at most the batch in flight."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self._writer: RowWriter | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self.out_dir / "parts" / f"rank{trainer.global_rank}.jsonl"
        self._writer = RowWriter(path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx) -> None:  # fmt: skip
        assert self._writer is not None
        self._writer.write(prediction)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ExamplesPerSecond(TQDMProgressBar):
    """Lightning's progress bar with the examples per second of this process."""

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._t0, self._seen = time.perf_counter(), 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx=0) -> None:  # fmt: skip
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._seen += len(batch)
        rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
        self.predict_progress_bar.set_postfix({"examples/s": f"{rate:.2f}"})


def done_pairs(out_dir: str | Path) -> set[tuple[str, str]]:
    """The (example_id, method) pairs already written in ``out_dir``."""
    return set(read_parts(out_dir))


def finished_examples(
    done: set[tuple[str, str]], examples: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> set[str]:
    """Examples with a row for every method."""
    return {e["example_id"] for e in examples if all((e["example_id"], m) in done for m in methods)}


__all__ = [
    "AttributionModule",
    "ExamplesPerSecond",
    "PromptDataModule",
    "ResultWriter",
    "done_pairs",
    "example_seed",
    "finished_examples",
]
