"""Prompts from the user's JSONL file: one ``{"id", "prompt", "answer"}`` object per line,
optionally with ``"features"`` (a granularity name or ``[[start, end], ...]`` character spans)
and ``"sources"`` (indices of the features the answer depends on, the ground truth of the
plausibility metrics).

Each line becomes an :class:`~tokattr.data.arithmetic.ArithmeticProblem` through
:func:`~tokattr.data.arithmetic.make_problem`, so an arithmetic prompt read from a file is
labelled and solved as a generated one; any other prompt is kept without roles. Every error
names the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokattr.data.arithmetic import ArithmeticProblem, make_problem
from tokattr.features import feature_spans


def read_jsonl(path: str | Path) -> list[ArithmeticProblem]:
    """Read problems from a JSONL file of ``{"id", "prompt", "answer"}`` objects.

    ``answer`` may be omitted: an arithmetic prompt is then solved, any other prompt keeps
    ``answer=None`` (the model's greedy answer is attributed); prompts that are not arithmetic
    get no roles. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}); a JSONL file is one JSON object "
            "per line"
        ) from None
    problems, seen = [], set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f'{where}: expected an object with "id", "prompt", "answer"')
        pid = str(row.get("id", lineno - 1))
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        try:
            problem = make_problem(pid, row["prompt"], row.get("answer"))
            features, sources = _features_and_sources(row, problem.prompt)
            problems.append(
                dataclasses.replace(problem, line=lineno, features=features, sources=sources)
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def _features_and_sources(
    row: dict, prompt: str
) -> tuple[str | tuple[tuple[int, int], ...] | None, tuple[int, ...] | None]:
    """A line's ``"features"`` (checked against its prompt) and ``"sources"`` (checked
    against its features)."""
    features = row.get("features")
    if features is not None and not isinstance(features, str):
        if not isinstance(features, list):
            raise ValueError('"features" must be a granularity name or a list of [start, end]')
        features = tuple(tuple(s) if isinstance(s, list) else s for s in features)
    spans = feature_spans(prompt, features) if features is not None else None
    sources = row.get("sources")
    if sources is None:
        return features, None
    if not isinstance(sources, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in sources
    ):
        raise ValueError('"sources" must be a list of feature indices')
    if spans is None:
        raise ValueError('"sources" index features: give "features" too')
    bad = [i for i in sources if not 0 <= i < len(spans)]
    if bad:
        raise ValueError(f'"sources" {bad} are not among the {len(spans)} features')
    return features, tuple(sources)
