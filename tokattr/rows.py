"""What a benchmark run writes, as types: one :class:`ResultRow` per (example, method) and
the :class:`RunIdentity` a resumed run must match. Both are frozen dataclasses with
``to_json`` / ``from_json``; this module imports no model code, so reading a finished run
needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

Number = float | None  # None where a value is undefined (JSON has no NaN)


def _clean(value: Any) -> Any:
    """JSON has no NaN: NaN (a metric undefined for an example) is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ResultRow:
    """One method's attribution of one example, with every metric's value for it.

    An error row (``error`` set) has no ``tokens``, ``scores`` or metrics: the reason is kept
    so a rerun keeps it, and ``--retry_errors`` computes it again.
    """

    example_id: str
    method: str
    prompt: str
    answer: str | None  # the answer attributed, as text
    answer_ids: list[int] | None = None  # its token ids, as scored
    tokens: list[str] | None = None  # the prompt's features, as the tokenizer spells them
    scores: list[float] | list[list[float]] | None = None  # one per token (per answer token)
    labels: list[str] | None = None  # each token's role, where the task labels them
    time_ms: float = 0.0  # the method's wall time for this example
    model_evals: int = 0  # sequences this example put through the model
    metrics: dict[str, Number | list[Number]] = field(default_factory=dict)  # per k: a list
    curves: dict[str, list[float]] | None = None  # f along the deletion / insertion curves
    error: str | None = None  # why there are no scores
    # Features of several tokens (None: one score per token, as ``tokens`` lists them).
    features: list[str] | None = None  # each feature's text; ``scores`` has one per feature
    spans: list[list[int]] | None = None  # each feature's character span in the prompt
    token_features: list[int] | None = None  # the feature of each of ``tokens``, -1: context
    sources: list[int] | None = None  # the features the answer depends on, where known
    bucket: str | None = None  # the data set's bucket of the example (e.g. "add"), where known

    @property
    def key(self) -> tuple[str, str]:
        return (self.example_id, self.method)

    @property
    def units(self) -> list[str] | None:
        """What ``scores`` are scores of: the features where they are groups of tokens, else
        the tokens."""
        return self.features if self.features is not None else self.tokens

    @property
    def ok(self) -> bool:
        """Scored (not an error row)."""
        return not self.error

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as null; ``error`` only on error rows)."""
        out = _clean(dataclasses.asdict(self))
        if out["error"] is None:
            del out["error"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRow:
        """A row from its JSON dict.

        Raises:
            ValueError: a key this version does not know, or a required one missing.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"result row with unknown field(s) {unknown}")
        missing = sorted({"example_id", "method", "prompt", "answer"} - set(data))
        if missing:
            raise ValueError(f"result row without {missing}")
        values = dict(data)
        values["example_id"] = str(values["example_id"])
        values["metrics"] = dict(values.get("metrics") or {})
        return cls(**values)


METRICS_VERSION = 2
"""Raised when a metric keeps its name but changes its meaning, so that a run of the old
meaning is not resumed into the new one (2: erasure areas in units of f, infidelity by feature
removal and as a root, plausibility against a random ranking)."""


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same run: the model (and a hash of its weights and tokenizer),
    the examples, the methods with their parameters, the metrics with theirs, the scoring
    settings and :data:`METRICS_VERSION`. Written to ``run.json``; a resumed run must match it
    (a ``run.json`` of an earlier version, without some field, is refused like a changed one)."""

    model: str
    weights: str
    dtype: str
    examples: list[list[Any]]  # [example_id, prompt, answer] each
    methods: dict[str, dict[str, Any]]
    metrics: list[str]
    metric_params: dict[str, dict[str, Any]]
    baseline: str
    target_fn: str
    shapley_max_tokens: int
    randomization_seed: int
    metrics_version: int = METRICS_VERSION

    def to_json(self) -> dict[str, Any]:
        # Through JSON once, so tuples and lists compare equal after a round trip.
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunIdentity:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing or set(data) - set(names):
            raise ValueError(
                f"run.json does not describe a run of this version (missing {missing}, "
                f"unknown {sorted(set(data) - set(names))})"
            )
        return cls(**data)

    def changed(self, other: RunIdentity) -> list[str]:
        """The fields in which ``other`` differs from this identity."""
        a, b = self.to_json(), other.to_json()
        return sorted(k for k in a if a[k] != b[k])
