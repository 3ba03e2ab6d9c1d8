"""The benchmark's examples (Lightning layer): fresh arithmetic problems or a JSONL file, in
fixed batches, minus those already finished in ``out_dir``, dealt out to the ranks as whole
batches (rank ``r`` of ``N`` takes batches ``r, r + N, …``; a rank may get none), so no example
is computed twice whatever the number of ranks and batches left (Lightning's own samplers
repeat examples under ``trainer.test`` and refuse a rank with nothing to do)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from tokattr.data import DEFAULT_MIX, ArithmeticGenerator, read_jsonl
from tokattr.data.lookup import LookupGenerator
from tokattr.features import feature_spans

DATASETS = ("arithmetic", "lookup")
"""The generators the benchmark can draw from (a JSONL file is the other source)."""


class PromptDataModule(pl.LightningDataModule):
    """Prompts for the benchmark: fresh arithmetic or lookup problems, or a JSONL file.

    Args:
        jsonl: a file of ``{"id", "prompt", "answer"}`` lines (``answer`` may be left out for
            arithmetic prompts; ``features`` and ``sources`` may be given,
            :mod:`tokattr.data.jsonl`); ``None``: the generator named by ``dataset``.
        dataset: ``"arithmetic"`` (default) or ``"lookup"`` (key-value lookup in a long
            context, :class:`tokattr.data.LookupGenerator`: each definition is a feature, the
            one queried the source).
        features: what gets a score, for every example: ``"token"``, ``"word"``,
            ``"sentence"``, ``"line"`` or ``"separator:<s>"``; ``None`` (default): each
            example's own (a JSONL line's ``features``, the lookup's definitions), else tokens.
        pairs: ``[lo, hi]`` definitions per lookup prompt.
        length: ``[lo, hi]`` characters (tokens of the bundled tokenizer) per lookup prompt,
            filled up with passages of digits that are features too but never sources;
            ``null`` for the definitions alone.
        filler: ``[lo, hi]`` digits per filler passage of a lookup prompt.
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
        dataset: str = "arithmetic",
        features: str | None = None,
        pairs: tuple[int, int] = (20, 52),
        length: tuple[int, int] | None = (100, 400),
        filler: tuple[int, int] = (8, 48),
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset: unknown {dataset!r}; choose from {list(DATASETS)}")
        if features is not None:
            feature_spans("x", features)  # an unknown granularity fails here
        self.dataset, self.features, self.pairs = dataset, features, tuple(pairs)
        self.length = None if length is None else (int(length[0]), int(length[1]))
        self.filler = (int(filler[0]), int(filler[1]))
        if dataset == "lookup":
            LookupGenerator(seed, self.pairs, self.length, self.filler)  # checks them now
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
            elif self.dataset == "lookup":
                lookup = LookupGenerator(self.seed, self.pairs, self.length, self.filler)  # type: ignore[arg-type]
                problems = [lookup.problem(i) for i in range(self.n)]
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
            where = (
                [f"{self.jsonl}:{p.line}" for p in problems]
                if self.jsonl is not None
                else [f"generator problem {i}" for i in range(len(problems))]
            )
            self._examples = [
                {
                    "example_id": str(p.id),
                    "prompt": p.prompt,
                    "answer": p.answer,
                    "roles": getattr(p, "roles", None),
                    "bucket": getattr(p, "bucket", None),
                    "where": w,
                    **self._features_of(p, w),
                }
                for p, w in zip(problems, where, strict=True)
            ]
        return self._examples

    def _features_of(self, problem: Any, where: str) -> dict[str, Any]:
        """An example's ``features`` and ``sources`` (none for tokens), checked now."""
        own = getattr(problem, "features", None)
        if own is None and getattr(problem, "segments", None) is not None:
            own = [list(s) for s in problem.segments]  # a lookup problem's definitions
        spec = self.features if self.features is not None else own
        if spec is None or spec == "token":
            return {}
        try:
            feature_spans(problem.prompt, spec)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        out: dict[str, Any] = {
            "features": spec if isinstance(spec, str) else [list(s) for s in spec]
        }
        if self.features is None and getattr(problem, "sources", None) is not None:
            out["sources"] = list(problem.sources)
        return out

    def chunks(self) -> list[list[dict[str, Any]]]:
        """The batches, fixed by position in the data set (batch i = examples ``[i*bs,
        (i+1)*bs)``) whatever the number of processes or what is already done, so that every
        example is computed in the same company, and gets the same numbers, in a 1-process,
        an N-process and a resumed run."""
        ex = self.examples()
        return [ex[i : i + self.batch_size] for i in range(0, len(ex), self.batch_size)]

    def todo(self) -> list[list[dict[str, Any]]]:
        """The batches with something left to do."""
        return [c for c in self.chunks() if any(e["example_id"] not in self.skip for e in c)]

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        todo = self.todo()
        return DataLoader(
            todo,
            batch_size=None,
            sampler=RankShard(todo, world, rank),
            collate_fn=_as_is,
        )


class RankShard(DistributedSampler):
    """Rank ``rank`` of ``num_replicas`` takes items ``rank, rank + num_replicas, …``: every
    item once over all ranks, none repeated, and a rank with nothing left gets no item (where
    Lightning's unrepeated sampler asserts). A :class:`DistributedSampler`, so Lightning keeps
    it instead of inserting its own."""

    def __init__(self, dataset: Sequence[Any], num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_is(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch
