"""The answer attributed: the model's greedy answer as the token ids it generates (the
default target of every attribution), or a given answer as text.

A greedy answer is never decoded and re-encoded: a BPE tokenizer may spell the same text with
other tokens, and the scores would then be of an answer the model did not give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tokattr.batching import Answer, check_prompt
from tokattr.messages import no_room, quote
from tokattr.models import LanguageModel

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
    for p in prompts:
        check_prompt(p)
    ids = lm.tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
    for p, row in zip(prompts, ids, strict=True):
        if why := no_room(p, len(row), lm.max_length):
            raise ValueError(why)
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


def fill_greedy_answers(
    lm: LanguageModel,
    prompts: Sequence[str],
    answers: Sequence[Answer | None],
    max_new_tokens: int | None = None,
) -> list[Answer]:
    """``answers`` with each ``None`` replaced by the model's greedy answer to its prompt (the
    generated token ids). Every prompt's length is checked in tokens before any generation.

    Raises:
        ValueError: a prompt with no room for an answer in the model's context, or an empty
            greedy answer (the model stops at once).
    """
    ids = prompt_token_ids(lm, prompts)  # lengths first: no generation for a prompt too long
    missing = [i for i, a in enumerate(answers) if a is None]
    out: list[Answer] = [a for a in answers]  # type: ignore[misc]
    if missing:
        greedy = greedy_answer_ids(lm, [ids[i] for i in missing], max_new_tokens)
        for i, g in zip(missing, greedy, strict=True):
            if not g:
                raise ValueError(
                    f"the model's greedy answer to {quote(prompts[i])} is empty (it stops at "
                    "once); pass target="
                )
            out[i] = g
    return out


def answer_text(lm: LanguageModel, answer: Answer) -> str:
    """An answer as text: a string as given, token ids decoded as they are (no stripping)."""
    if isinstance(answer, str):
        return answer
    ids = answer.tolist() if isinstance(answer, Tensor) else list(answer)
    return lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def texts_of(
    lm: LanguageModel, given: Sequence[str | None] | None, ids: Sequence[Sequence[int] | None]
) -> list[str | None]:
    """The text to report for each answer (or foil): the string given, else its token ids
    decoded (:func:`answer_text`); ``None`` where there are no ids (no foil)."""
    given = given or [None] * len(ids)
    return [
        None if i is None else g if g is not None else answer_text(lm, i)
        for g, i in zip(given, ids, strict=True)
    ]
