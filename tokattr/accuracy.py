"""Greedy exact-match accuracy of a model on arithmetic buckets (``tokattr eval-model``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokattr.answers import DEFAULT_MAX_NEW_TOKENS, greedy_answer_ids, stop_token_ids
from tokattr.data.arithmetic import SEPARATOR, ArithmeticGenerator
from tokattr.data.buckets import BUCKETS, FORMATTED_BUCKETS
from tokattr.models import LanguageModel

SEED_PROMPT = "$16,000/-0.8="
SEED_ANSWER = "-20000"

BARS: dict[str, float] = {
    "add": 0.98,
    "sub": 0.98,
    "div": 0.90,
    "mul_1x2": 0.90,
    "mul_2x2": 0.70,
    "formatted": 0.80,
    "seed_prompt": 1.0,
}
"""The project's greedy exact-match bars for the reference model, per bucket."""

LOOKUP_BAR = 0.95
"""The bar of a lookup model (:func:`lookup_accuracy`'s ``lookup`` row)."""


def greedy_answers(
    lm: LanguageModel,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """The model's greedy continuation of each arithmetic prompt as text (decoded and
    stripped), stopping at EOS or the demonstration separator: what exact-match accuracy
    compares. Attribution uses the ids themselves (:func:`greedy_answer_ids`)."""
    stops = stop_token_ids(lm, extra=(SEPARATOR,))
    ids = greedy_answer_ids(lm, prompts, max_new_tokens, batch_size, stops)
    return [lm.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


@dataclass(frozen=True)
class BucketAccuracy:
    """Exact-match counts for one bucket, with a few wrong answers to look at."""

    bucket: str
    correct: int
    total: int
    examples_wrong: tuple[tuple[str, str, str], ...]  # (prompt, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def bucket_accuracy(
    lm: LanguageModel,
    n_per_bucket: int = 500,
    seed: int = 2026,
    buckets: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[BucketAccuracy]:
    """Greedy exact match on ``n_per_bucket`` fresh problems of each bucket.

    Rows: each bucket of :data:`BUCKETS` (queries alone), ``formatted`` (the formatted
    buckets pooled), ``demonstrations`` (queries of the default mix after 1–4 solved
    examples), and ``seed_prompt`` (``$16,000/-0.8=`` answered ``-20000``).
    """
    rows: list[BucketAccuracy] = []
    for bucket in buckets or [*BUCKETS, "demonstrations"]:
        if bucket == "demonstrations":
            gen = ArithmeticGenerator(seed, demonstrations=(1, 4))
        else:
            gen = ArithmeticGenerator(seed, mix=bucket)
        problems = gen.take(n_per_bucket)
        got = greedy_answers(lm, [p.prompt for p in problems], batch_size=batch_size)
        wrong = [
            (p.prompt, p.answer, g) for p, g in zip(problems, got, strict=True) if g != p.answer
        ]
        rows.append(
            BucketAccuracy(bucket, len(problems) - len(wrong), len(problems), tuple(wrong[:5]))
        )
    formatted = [r for r in rows if r.bucket in FORMATTED_BUCKETS]
    if formatted:
        rows.append(
            BucketAccuracy(
                "formatted",
                sum(r.correct for r in formatted),
                sum(r.total for r in formatted),
                (),
            )
        )
    (seed_got,) = greedy_answers(lm, [SEED_PROMPT])
    rows.append(
        BucketAccuracy(
            "seed_prompt",
            int(seed_got == SEED_ANSWER),
            1,
            () if seed_got == SEED_ANSWER else ((SEED_PROMPT, SEED_ANSWER, seed_got),),
        )
    )
    return rows


LOOKUP_BINS = ((8, 19), (20, 35), (36, 52))
"""Definitions per prompt of the lookup accuracy rows (besides all of them pooled)."""
LOOKUP_LENGTH_BINS = ((1, 99), (100, 199), (200, 299), (300, 400))
"""Prompt lengths in characters (tokens of the bundled tokenizer) of further rows."""


def lookup_accuracy(
    lm: LanguageModel,
    n: int = 500,
    seed: int = 2026,
    pairs: tuple[int, int] = (20, 52),
    length: tuple[int, int] | None = (100, 400),
    filler: tuple[int, int] = (8, 48),
    batch_size: int = 64,
) -> list[BucketAccuracy]:
    """Greedy exact match on ``n`` fresh lookup problems (:mod:`tokattr.data.lookup`):
    ``lookup`` pooled, then one row per :data:`LOOKUP_BINS` bin of definitions per prompt and
    per :data:`LOOKUP_LENGTH_BINS` bin of prompt length (empty bins left out)."""
    from tokattr.data.lookup import LookupGenerator

    problems = LookupGenerator(seed, pairs, length, filler).take(n)
    got = greedy_answers(lm, [p.prompt for p in problems], max_new_tokens=4, batch_size=batch_size)
    ok = [g == p.answer for p, g in zip(problems, got, strict=True)]

    def row(name: str, keep: list[int]) -> BucketAccuracy:
        wrong = [(problems[i].prompt, problems[i].answer, got[i]) for i in keep if not ok[i]]
        return BucketAccuracy(name, sum(ok[i] for i in keep), len(keep), tuple(wrong[:3]))

    rows = [row("lookup", list(range(n)))]
    for lo, hi in LOOKUP_BINS:
        keep = [i for i, p in enumerate(problems) if lo <= len(p.definitions) <= hi]
        if keep:
            rows.append(row(f"{lo}-{hi} definitions", keep))
    for lo, hi in LOOKUP_LENGTH_BINS:
        keep = [i for i, p in enumerate(problems) if lo <= len(p.prompt) <= hi]
        if keep:
            rows.append(row(f"{lo}-{hi} tokens", keep))
    return rows


def accuracy_markdown(rows: Sequence[BucketAccuracy]) -> str:
    """A markdown table of :func:`bucket_accuracy` rows, with the :data:`BARS` they face."""
    lines = ["| bucket | correct | total | accuracy | bar |", "|---|---:|---:|---:|---|"]
    bars = {**BARS, "lookup": LOOKUP_BAR}
    for r in rows:
        bar = bars.get(r.bucket)
        verdict = (
            "" if bar is None else f"≥ {bar:.0%} " + ("met" if r.accuracy >= bar else "**not met**")
        )
        lines.append(f"| {r.bucket} | {r.correct} | {r.total} | {r.accuracy:.1%} | {verdict} |")
    return "\n".join(lines)
