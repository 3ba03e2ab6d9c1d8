"""Greedy exact-match accuracy of a model on arithmetic buckets (``tokattr eval-model``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokattr.data.arithmetic import BUCKETS, FORMATTED_BUCKETS, SEPARATOR, ArithmeticGenerator
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


def stop_token_ids(lm: LanguageModel) -> list[int]:
    """Tokens that end an answer: EOS, and the demonstration separator if it is one token."""
    tok = lm.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    sep = tok.convert_tokens_to_ids(SEPARATOR)
    if isinstance(sep, int) and sep != tok.unk_token_id:
        ids.append(sep)
    return ids


@torch.no_grad()
def greedy_answers(
    lm: LanguageModel,
    prompts: Sequence[str],
    max_new_tokens: int = 12,
    batch_size: int = 256,
) -> list[str]:
    """The model's greedy continuation of each prompt, up to (not including) a stop token.

    Prompts are left-padded in batches of ``batch_size``.
    """
    tok = lm.tokenizer
    stops = stop_token_ids(lm)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True).to(lm.device)
        gen = lm.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )  # [batch prompt+new]
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return out


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


def accuracy_markdown(rows: Sequence[BucketAccuracy]) -> str:
    """A markdown table of :func:`bucket_accuracy` rows, with the :data:`BARS` they face."""
    lines = ["| bucket | correct | total | accuracy | bar |", "|---|---:|---:|---:|---|"]
    for r in rows:
        bar = BARS.get(r.bucket)
        verdict = (
            "" if bar is None else f"≥ {bar:.0%} " + ("met" if r.accuracy >= bar else "**not met**")
        )
        lines.append(f"| {r.bucket} | {r.correct} | {r.total} | {r.accuracy:.1%} | {verdict} |")
    return "\n".join(lines)
