"""The benchmark runner (Lightning layer): every method and metric over a prompt set, sharded
over processes, each (example, method) pair computed once, results written as produced.

- :class:`~tokattr.lightning.prompts.PromptDataModule` — the examples, in fixed batches,
  dealt out to the ranks (:mod:`tokattr.lightning.prompts`).
- :class:`AttributionModule` — the model; ``predict_step`` runs every method and metric on a
  batch (:func:`tokattr.evaluation.score_batch`) and returns rows.
- :class:`ResultWriter` — appends each batch's rows to ``out_dir/parts/rank{r}.jsonl``.
- :class:`ExamplesPerSecond` — the progress bar, with examples/s.

Random methods and random perturbations seed from the example id (not the rank), so one
process and N processes give the same numbers.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

from tokattr.answers import answer_text
from tokattr.batching import encode_example
from tokattr.data.labels import token_roles
from tokattr.evaluation import needs_random_model, score_batch
from tokattr.lightning.prompts import PromptDataModule
from tokattr.messages import no_room
from tokattr.methods import METHODS
from tokattr.metrics import ExactShapleyCache, applies
from tokattr.models import load_model, reinitialised
from tokattr.problems import DEFAULT_BATCH_SIZE
from tokattr.results import RowWriter, read_parts
from tokattr.rows import ResultRow
from tokattr.validation import check_baseline, check_bench_target, method_specs, metric_names


def example_seed(example_id: str) -> int:
    """The seed of an example's random draws: a stable hash of its id (CRC-32), the same on
    every rank and in every run."""
    return zlib.crc32(str(example_id).encode())


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
        device_map: split the model over this process's devices (and CPU, and disk) with
            Accelerate (:func:`tokattr.load_model`): ``"auto"`` or module -> device. The model
            then stays where the map put it (Lightning does not move it), so the run has one
            process (``trainer.devices: 1``). ``None``: the whole model on the trainer's device.
        max_memory: with ``device_map``, device -> the most memory for weights there, e.g.
            ``{0: "10GiB", "cpu": "30GiB"}``.
        offload_folder: with ``device_map``, where the weights offloaded to disk go.
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
        device_map: str | dict[str, int | str] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | None = None,
    ) -> None:
        super().__init__()
        self.methods = method_specs({m: {} for m in METHODS} if methods is None else methods)
        self.metric_params = dict(metric_params or {})
        self.metric_names = metric_names(metrics, self.metric_params, list(self.methods))
        check_baseline(baseline)
        check_bench_target(target_fn)
        self.baseline, self.target_fn = baseline, target_fn
        self.forward_batch_size = forward_batch_size
        self.shapley_max_tokens, self.randomization_seed = shapley_max_tokens, randomization_seed
        if device_map is not None and needs_random_model(self.metric_names):
            raise ValueError(
                "randomization_spearman needs a re-initialised copy of the model on one device; "
                "leave it out of the metrics with a device_map"
            )
        self.lm = load_model(
            model, dtype=dtype, device_map=device_map, max_memory=max_memory,
            offload_folder=offload_folder,
        )  # fmt: skip
        self.model_name = model
        if device_map is None:
            self.net = self.lm.model  # a submodule, so that Lightning moves it to the device
        # else: not a submodule, so no strategy moves the model off the devices of its map
        self.random_lm = (
            reinitialised(self.lm, randomization_seed)
            if needs_random_model(self.metric_names)
            else None
        )
        self.random_net = None if self.random_lm is None else self.random_lm.model
        self.done: set[tuple[str, str]] = set()  # (example_id, method) pairs already on disk
        self._lockstep: Any = None  # set when the model is sharded (configure_model)
        self._lockstep_on = self._drained = False
        # A rank may have no batch left (fewer batches than ranks, or a resume): it runs none
        # and waits at the merge barrier, where Lightning would otherwise stop it.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``configs/bench/fsdp.yaml``): shard the decoder
        layers over the data-parallel group with FSDP2 (:mod:`tokattr.lightning.sharding`)."""
        mesh = self.device_mesh
        if mesh is None or self._lockstep is not None:
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "tensor_parallel_size > 1 is not supported: attribution runs FSDP2 over the "
                "data-parallel group only (set tensor_parallel_size: 1)"
            )
        from tokattr.lightning.sharding import Lockstep, shard_layers

        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        n = shard_layers(self.lm.model, dp)
        self._lockstep = Lockstep(self.lm.model, group=dp.get_group())
        print(
            f"rank {self.global_rank}: {n} decoder layers sharded over {dp.size()} ranks (FSDP2)",
            file=sys.stderr,
            flush=True,
        )

    def on_predict_start(self) -> None:
        if self._lockstep is not None:
            self._lockstep.__enter__()
            self._lockstep_on = True

    def on_predict_end(self) -> None:
        self.finish_passes()

    def finish_passes(self) -> None:
        """A sharded model: run the other ranks' remaining passes beside them until every rank
        is done, once per run (every rank calls it, also one that had no batch, for which
        Lightning calls no predict hook): each drain ends on a round all ranks share."""
        ls = self._lockstep
        if ls is None or self._drained:
            return
        ls.drain()
        self._drained = True
        if self._lockstep_on:
            ls.__exit__(None, None, None)
            self._lockstep_on = False
        print(
            f"rank {self.global_rank}: {ls.passes} forward passes of its own, "
            f"{ls.dummies} run in step with other ranks",
            file=sys.stderr,
            flush=True,
        )

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[ResultRow]:
        rows: list[ResultRow] = []
        answers, failed = self._answers(batch)
        exact = ExactShapleyCache(self.shapley_max_tokens)  # shared by the SHAP estimators
        for method, params in self.methods.items():
            missing = {e["example_id"] for e in batch} - {e for e, m in self.done if m == method}
            if not missing:
                continue
            # The whole batch, so each example keeps its batch-mates (and its numbers); only
            # the rows not on disk yet are written.
            new = self._score(method, params or {}, batch, answers, failed, exact)
            rows += [r for r in new if r.example_id in missing]
        return rows

    def _answers(self, batch: list[dict[str, Any]]) -> tuple[list[Any], dict[int, str]]:
        """Each example's answer (its own, or the greedy answer's generated token ids) and,
        for those that cannot be attributed, why: a prompt with no room for an answer in the
        model's context (checked in tokens, before any generation) or an empty greedy answer."""
        from tokattr.answers import greedy_answer_ids

        tok, limit = self.lm.tokenizer, self.lm.max_length
        answers: list[Any] = [e.get("answer") or None for e in batch]
        failed: dict[int, str] = {}
        ids = tok([e["prompt"] for e in batch], add_special_tokens=True, verbose=False)["input_ids"]
        for i, row in enumerate(ids):
            if why := no_room(batch[i]["prompt"], len(row), limit):
                failed[i] = why
        missing = [i for i, a in enumerate(answers) if a is None and i not in failed]
        if missing:
            greedy = greedy_answer_ids(self.lm, [list(ids[i]) for i in missing])
            for i, g in zip(missing, greedy, strict=True):
                if g:
                    answers[i] = g
                else:
                    failed[i] = "the model's greedy answer is empty (it stops at once)"
        return answers, failed

    def _score(self, method, params, examples, answers, failed, exact_cache):
        lm = self.lm
        ok, rows = [], []
        for i, (e, a) in enumerate(zip(examples, answers, strict=True)):
            if i in failed:
                rows.append(self._error_row(e, a, method, failed[i]))
                continue
            try:
                enc = encode_example(
                    lm.tokenizer, e["prompt"], a, None, lm.max_length,
                    features=_spec(e.get("features")),
                )  # fmt: skip
            except (ValueError, TypeError) as err:
                rows.append(self._error_row(e, a, method, err))
                continue
            if method == "exact_shapley" and _n_features(enc) > params.get(
                "max_tokens", self.shapley_max_tokens
            ):
                rows.append(self._error_row(e, a, method, "too many features for exact Shapley"))
                continue
            ok.append((e, a, enc))
        if not ok:
            return rows
        metrics = [n for n in self.metric_names if applies(n, method, self.methods)]
        scored = score_batch(
            lm,
            [enc for _, _, enc in ok],
            [e["prompt"] for e, _, _ in ok],
            [a if isinstance(a, str) else None for _, a, _ in ok],
            [example_seed(e["example_id"]) for e, _, _ in ok],
            method,
            params,
            metrics,
            self.metric_params,
            baseline=self.baseline,
            target_fn=self.target_fn,
            batch_size=self.forward_batch_size,
            random_model=self.random_lm,
            exact=exact_cache,
            roles=[e.get("roles") for e, _, _ in ok],
            keep_errors=True,
            sources=[e.get("sources") for e, _, _ in ok],
        )
        for j, ((e, a, _), attr) in enumerate(zip(ok, scored.attributions, strict=True)):
            if j in scored.errors:
                rows.append(self._error_row(e, a, method, scored.errors[j]))
                continue
            labels = (
                token_roles(attr.offsets, e["prompt"], e["roles"])
                if e.get("roles") is not None and attr.granularity == "token"
                else None
            )
            grouped = attr.granularity != "token"
            rows.append(
                ResultRow(
                    example_id=e["example_id"],
                    method=method,
                    prompt=e["prompt"],
                    answer=attr.target,
                    answer_ids=attr.answer_ids,
                    tokens=attr.tokens,
                    scores=attr.scores.tolist(),
                    labels=labels,
                    time_ms=attr.time_ms,
                    model_evals=attr.model_evals,
                    metrics={n: v[j].tolist() for n, v in scored.values.items()},
                    curves=None if scored.curves is None else scored.curves[j],
                    features=attr.features if grouped else None,
                    spans=[list(s) for s in attr.spans] if grouped else None,
                    token_features=attr.token_features if grouped else None,
                    sources=e.get("sources"),
                    bucket=e.get("bucket"),
                )
            )
        return rows

    def _error_row(self, e, answer, method, err) -> ResultRow:
        """A row with no scores, and the reason (``error``), written like any other row so a
        rerun keeps it (``--retry_errors`` computes it again)."""
        text = answer if answer is None or isinstance(answer, str) else answer_text(self.lm, answer)
        return ResultRow(
            example_id=e["example_id"],
            method=method,
            prompt=e["prompt"],
            answer=text,
            answer_ids=None if text is answer else list(answer),
            error=str(err),
            bucket=e.get("bucket"),
        )


def _n_features(enc) -> int:
    return len(enc.spans) if enc.spans is not None else sum(not s for s in enc.special)


def _spec(features: Any) -> Any:
    """An example's feature specification as :func:`~tokattr.batching.encode_example` takes
    it (spans as tuples); tokens where it has none."""
    if features is None:
        return "token"
    return features if isinstance(features, str) else [tuple(s) for s in features]


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


def done_pairs(out_dir: str | Path, keep_errors: bool = True) -> set[tuple[str, str]]:
    """The (example_id, method) pairs already written in ``out_dir``; ``keep_errors=False``
    leaves out the error rows (to compute them again)."""
    rows = read_parts(out_dir)
    return {k for k, r in rows.items() if keep_errors or r.ok}


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
