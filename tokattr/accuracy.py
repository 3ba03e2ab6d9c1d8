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


DEFAULT_MAX_NEW_TOKENS = 12
"""Greedy answers are at most this many tokens unless the model's generation config or the
caller says otherwise."""


def stop_token_ids(lm: LanguageModel, extra: Sequence[str] = ()) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS, the model's generation-config EOS ids
    (the bundled model lists its demonstration separator there), and each of ``extra`` that is
    one token of the vocabulary."""
    tok = lm.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    config = getattr(lm.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    for text in extra:
        sep = tok.convert_tokens_to_ids(text)
        if isinstance(sep, int) and sep != tok.unk_token_id:
            ids.append(sep)
    return list(dict.fromkeys(ids))


def max_new_tokens_of(lm: LanguageModel) -> int:
    """The model's generation-config ``max_new_tokens``, or :data:`DEFAULT_MAX_NEW_TOKENS`."""
    n = getattr(getattr(lm.model, "generation_config", None), "max_new_tokens", None)
    return n if isinstance(n, int) and n > 0 else DEFAULT_MAX_NEW_TOKENS


def prompt_token_ids(lm: LanguageModel, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids (special tokens included), in one tokenizer call, checked
    against the model's context before any generation: a prompt that leaves no room for an
    answer is a one-line error."""
    from tokattr.batching import check_prompt, quote

    for p in prompts:
        check_prompt(p)
    ids = lm.tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
    limit = lm.max_length
    for p, row in zip(prompts, ids, strict=True):
        if len(row) >= limit:
            raise ValueError(
                f"prompt is {len(row)} tokens, and the model's context of {limit} leaves no "
                f"room for an answer: {quote(p)}"
            )
    return [list(r) for r in ids]


@torch.no_grad()
def greedy_answer_ids(
    lm: LanguageModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    stops: Sequence[int] | None = None,
) -> list[list[int]]:
    """The token ids the model generates greedily after each prompt, up to (not including)
    the first stop token (:func:`stop_token_ids`): the answer as generated, never decoded and
    re-encoded. ``prompts`` may be texts or their token ids (special tokens included).

    Prompts are left-padded in batches of ``batch_size``; a batch generates at most
    ``max_new_tokens`` (default: :func:`max_new_tokens_of`), and never past the model's
    context. Prompt lengths are checked (:func:`prompt_token_ids`) before anything runs.
    """
    tok = lm.tokenizer
    stops = stop_token_ids(lm) if stops is None else list(stops)
    limit = max_new_tokens_of(lm) if max_new_tokens is None else int(max_new_tokens)
    if limit < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    texts = [p for p in prompts if isinstance(p, str)]
    if texts and len(texts) != len(prompts):
        raise ValueError("give prompts as texts or as token ids, not both")
    rows = prompt_token_ids(lm, prompts) if texts else [list(p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    # Each prompt may generate up to `limit` tokens or to the end of the context, whichever
    # comes first: prompts are batched with others of the same room, so a long prompt never
    # cuts its batch-mates' answers short.
    room_of = [min(limit, lm.max_length - len(r)) for r in rows]
    if min(room_of) < 1:
        i = room_of.index(min(room_of))
        raise ValueError(
            f"a prompt of {len(rows[i])} tokens leaves no room for an answer in the model's "
            f"context of {lm.max_length}"
        )
    groups: dict[int, list[int]] = {}
    for i, room in enumerate(room_of):
        groups.setdefault(room, []).append(i)
    answers: dict[int, list[int]] = {}
    for room, members in groups.items():
        for c in range(0, len(members), batch_size):
            part = members[c : c + batch_size]
            for i, ids in zip(part, _generate(lm, [rows[i] for i in part], room, stops, pad),
                              strict=True):  # fmt: skip
                answers[i] = ids
    return [answers[i] for i in range(len(rows))]


def _generate(
    lm: LanguageModel, chunk: list[list[int]], room: int, stops: list[int], pad: int
) -> list[list[int]]:
    """One left-padded ``generate`` call over ``chunk``: each row's new ids to its first stop."""
    width = max(len(r) for r in chunk)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=lm.device)
    gen = lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=room,
        do_sample=False,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )  # [batch, width + new]
    out = []
    for row in gen[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


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
