"""Prompts and answers -> one padded token batch, the layout every target function reads.

Each row is ``[left padding][prompt tokens][answer tokens][right padding]``. Prompts are
left-padded so that every prompt ends in the same column; the answer (teacher-forced) follows
in a *continuation slot* that is right-padded to the longest answer (or foil). Right padding
after the last real token cannot change any real position of a causal LM, and left padding is
made invisible by the attention mask and by position ids counted from the first real token
(``cumsum(attention_mask) - 1``), so a prompt scores the same alone or in a batch.

Features (the tokens that get scores) are the prompt's tokens minus BOS and every other
special token (:func:`special_ids`, a chat template's markers included). An answer is
either token ids, used as they are (the model's greedy answer is the ids it generated), or a
string, tokenized once in context: its tokens are those of ``prompt + answer`` after the
prompt's own tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tokattr.features import Span, feature_spans, granularity_of, token_features
from tokattr.messages import no_room, quote

Answer = str | Sequence[int]
"""An answer: a string (tokenized in context after the prompt) or the token ids themselves."""

Features = str | Sequence[Span]
"""What a prompt's features are: ``"token"``, ``"word"``, ``"sentence"``, ``"line"``,
``"separator:<s>"`` or explicit character spans (:func:`tokattr.features.feature_spans`)."""


def is_token_ids(value: object) -> bool:
    """Whether ``value`` is a sequence of token ids (ints), not a string or a list of strings."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | Tensor):
        return False
    if isinstance(value, Tensor) and value.dim() != 1:
        return False
    items = value.tolist() if isinstance(value, Tensor) else list(value)
    return bool(items) and all(isinstance(i, int) and not isinstance(i, bool) for i in items)


@dataclass(frozen=True)
class Encoded:
    """One example's tokens: prompt (with BOS/special tokens), answer and optional foil ids."""

    prompt_ids: list[int]
    special: list[bool]  # [len(prompt_ids)] True for BOS and other special tokens
    offsets: list[tuple[int, int]]  # [len(prompt_ids)] character span in the prompt
    answer_ids: list[int]
    foil_ids: list[int] | None
    spans: list[Span] | None = None  # feature spans (None: every token is a feature)
    feature_of: list[int] | None = None  # [len(prompt_ids)] feature of each token, -1 if none
    feature_texts: list[str] | None = None  # each feature's text
    granularity: str = "token"  # what the features are (tokattr.features.granularity_of)

    def feature_key(self) -> tuple[Span, ...] | None:
        """What identifies the features beyond the tokens (``None`` for single tokens)."""
        return None if self.spans is None else tuple(self.spans)


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch: ``batch`` examples, ``seq = prompt_width + slot_width`` columns.

    Per-example lists hold the features only (prompt tokens that are not special), in order.
    """

    input_ids: Tensor  # [batch, seq] prompt + answer
    attention_mask: Tensor  # [batch, seq] 1 on real tokens
    position_ids: Tensor  # [batch, seq] cumsum(attention_mask) - 1, clamped at 0
    feature_mask: Tensor  # [batch, seq] bool, prompt tokens that are features
    answer_mask: Tensor  # [batch, seq] bool, answer tokens
    foil_ids: Tensor | None  # [batch, seq] prompt + foil
    foil_attention_mask: Tensor | None  # [batch, seq]
    foil_mask: Tensor | None  # [batch, seq] bool, foil tokens
    foil_position_ids: Tensor | None  # [batch, seq] positions of prompt + foil
    prompt_width: int  # columns [0, prompt_width) hold the (left-padded) prompts
    tokens: list[list[str]]  # features as the tokenizer spells them, e.g. '▁$'
    token_ids: list[list[int]]
    offsets: list[list[tuple[int, int]]]  # features' character spans in the prompt
    answer_tokens: list[list[str]]
    # Features of several tokens (None: every feature is one token, as feature_mask says).
    feature_ids: Tensor | None = None  # [batch, seq] long, the feature of each column, -1 off
    features: list[list[str]] | None = None  # each example's feature texts
    spans: list[list[Span]] | None = None  # each example's feature character spans

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {
            name: (value.to(device) if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return TokenBatch(**moved)


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict:
    return tokenizer(
        text,
        add_special_tokens=True,
        return_special_tokens_mask=True,
        return_offsets_mapping=tokenizer.is_fast,
    )


Tokenize = Callable[[str], dict]
"""``text -> encoding`` (``input_ids``, ``special_tokens_mask``, ``offset_mapping`` where the
tokenizer is fast), as :func:`_encode_text` returns it."""


class NotAPrefixError(ValueError):
    """The answer changes how the prompt is tokenized."""


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: Answer,
    foil: Answer | None = None,
    max_length: int | None = None,
    tokenize: Tokenize | None = None,
    specials: frozenset[int] | None = None,
    features: Features = "token",
) -> Encoded:
    """Tokenize one prompt and its answer (and foil) the way the model will read them.

    ``features`` other than ``"token"`` group the prompt's tokens: a token belongs to the
    feature span holding its first non-space character (:mod:`tokattr.features`), special
    tokens and tokens outside every span belong to none.

    A prompt that ends in whitespace the tokenizer merges into the answer's first token
    (``"9 - 556 = "`` + ``"-547"`` reads ``▁=  ▁-  5 4 7`` with a metaspace tokenizer, not
    ``▁= ▁ - …``) gives that whitespace to the answer: the tokens are then exactly those of
    ``prompt + answer`` read as one text, as the model saw such text in training.

    An answer (or foil) given as token ids is taken as it is, after the prompt's own tokens:
    what the model generated, with no decode and re-encode between (which can merge, split or
    mangle tokens with a byte-level BPE tokenizer).

    ``tokenize`` (``text -> encoding``, default: call the tokenizer) and ``specials`` (the
    tokenizer's special token ids) let :func:`encode_examples` share one batched tokenizer call
    and one lookup across examples.

    Raises:
        ValueError: an empty prompt, a prompt with no non-special token, an empty answer,
            ``prompt + answer`` longer than ``max_length``, or prompt tokens that are not a
            prefix of the tokens of ``prompt + answer`` (the answer would change how the prompt
            is split, so "the answer's tokens" would not be defined); features that are not
            valid (:func:`tokattr.features.feature_spans`) or a feature that holds no token.
    """
    check_prompt(prompt)
    spans = feature_spans(prompt, features)
    kind = granularity_of(features)
    encoded = _encode_checked(
        tokenizer, prompt, answer, foil, max_length, tokenize, specials, spans
    )
    return encoded if kind == "token" else dataclasses.replace(encoded, granularity=kind)


def _encode_checked(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: Answer,
    foil: Answer | None,
    max_length: int | None,
    tokenize: Tokenize | None,
    specials: frozenset[int] | None,
    spans: list[Span] | None,
) -> Encoded:
    if tokenize is None:
        tokenize = functools.partial(_encode_text, tokenizer)
    specials = special_ids(tokenizer) if specials is None else specials
    try:
        return _encode(tokenizer, prompt, answer, foil, max_length, tokenize, specials, spans)
    except NotAPrefixError:
        stripped = prompt.rstrip()
        if stripped == prompt or not stripped or is_token_ids(answer) or is_token_ids(foil):
            raise
        tail = prompt[len(stripped) :]
        return _encode(
            tokenizer,
            stripped,
            tail + answer,
            None if foil is None or is_token_ids(foil) else tail + foil,
            max_length,
            tokenize,
            specials,
            spans,
            prompt,
        )


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that are never features: the tokenizer's special tokens (BOS, EOS, pad, …) and every
    token added as special (a chat template's ``<|im_start|>``, ``<|im_end|>``, …), wherever
    they occur in a prompt."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(tokenizer.all_special_ids) | frozenset(
        i for i, t in added.items() if getattr(t, "special", False)
    )


def check_prompt(prompt: object) -> None:
    """A prompt must be a non-empty string (a clear error for anything else)."""
    if not isinstance(prompt, str):
        raise TypeError(
            f"a prompt must be a string, got {type(prompt).__name__} {quote(prompt, 40)}"
        )
    if not prompt:
        raise ValueError("empty prompt: give a non-empty string")


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[Answer],
    foils: Sequence[Answer | None] | None = None,
    max_length: int | None = None,
    features: Sequence[Features] | None = None,
) -> list[Encoded]:
    """:func:`encode_example` for each ``(prompt, answer, foil)``, with every prompt and every
    ``prompt + answer`` (and ``prompt + foil``) text tokenized in one batched tokenizer call
    (one call's overhead, not one per text). Same results and errors, in the same order, as
    :func:`encode_example` on each example in turn (except where the tokenizer itself raises on
    a text: then that error comes first). ``features``: one per prompt (default: tokens)."""
    foil_list = [None] * len(prompts) if foils is None else list(foils)
    feature_list = ["token"] * len(prompts) if features is None else list(features)
    if len(feature_list) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(feature_list)} feature specifications")
    if not len(prompts) == len(answers) == len(foil_list):
        raise ValueError(
            f"{len(prompts)} prompts, {len(answers)} answers and {len(foil_list)} foils: give "
            "one of each per example"
        )
    texts: dict[str, None] = {}  # ordered, unique
    for p, a, f in zip(prompts, answers, foil_list, strict=True):
        if not (isinstance(p, str) and p):
            break  # encode_example raises on it, after the examples before it
        texts[p] = None
        for c in (a, f):
            if isinstance(c, str) and c:
                texts[p + c] = None
    known: dict[str, dict] = {}
    if texts:
        batch = tokenizer(
            list(texts),
            add_special_tokens=True,
            return_special_tokens_mask=True,
            return_offsets_mapping=tokenizer.is_fast,
        )
        keys = list(batch.keys())
        for i, text in enumerate(texts):
            known[text] = {k: batch[k][i] for k in keys}

    def tokenize(text: str) -> dict:
        enc = known.get(text)
        return _encode_text(tokenizer, text) if enc is None else enc

    specials = special_ids(tokenizer)
    return [
        encode_example(tokenizer, p, a, f, max_length, tokenize, specials, g)
        for p, a, f, g in zip(prompts, answers, foil_list, feature_list, strict=True)
    ]


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: Answer,
    foil: Answer | None,
    max_length: int | None,
    tokenize: Tokenize,
    specials: frozenset[int],
    spans: list[Span] | None = None,
    text: str | None = None,
) -> Encoded:
    """``text``: the prompt the ``spans`` index (``prompt`` is it, or it without trailing
    whitespace given to the answer)."""
    enc = tokenize(prompt)
    prompt_ids: list[int] = list(enc["input_ids"])
    special = [
        bool(m) or i in specials
        for i, m in zip(prompt_ids, enc["special_tokens_mask"], strict=True)
    ]
    if all(special):
        raise ValueError(f"prompt {quote(prompt)} has no token to attribute (only special tokens)")
    if max_length is not None and (why := no_room(prompt, len(prompt_ids), max_length)):
        raise ValueError(why)
    offsets = (
        [tuple(o) for o in enc["offset_mapping"]]
        if "offset_mapping" in enc
        else [(0, 0)] * len(prompt_ids)
    )

    def continuation(text: Answer, what: str) -> list[int]:
        if is_token_ids(text):
            rest = [int(i) for i in (text.tolist() if isinstance(text, Tensor) else text)]
            bad = [i for i in rest if not 0 <= i < len(tokenizer)]
            if bad:
                raise ValueError(
                    f"the {what}'s token id {bad[0]} is outside the vocabulary (0 to "
                    f"{len(tokenizer) - 1})"
                )
            full = prompt_ids + rest
        else:
            if not isinstance(text, str):
                raise TypeError(
                    f"the {what} for prompt {quote(prompt, 40)} must be a string or token ids, "
                    f"got {type(text).__name__} {quote(text, 40)}"
                )
            if not text:
                raise ValueError(f"empty {what} for prompt {quote(prompt)}")
            full = list(tokenize(prompt + text)["input_ids"])
            if full[: len(prompt_ids)] != prompt_ids:
                n = next(
                    (i for i, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b),
                    min(len(prompt_ids), len(full)),
                )
                raise NotAPrefixError(
                    f"the {what} {quote(text, 40)} changes how the prompt is tokenized (prompt "
                    f"token {n} {tokenizer.convert_ids_to_tokens(prompt_ids[n : n + 1])} becomes "
                    f"{tokenizer.convert_ids_to_tokens(full[n : n + 2])} in prompt + {what}); "
                    f"start the {what} at a token boundary (e.g. a leading space for BPE "
                    f"tokenizers), or give its token ids. Prompt: {quote(prompt)}"
                )
            rest = full[len(prompt_ids) :]
            if not rest:
                raise ValueError(
                    f"the {what} {quote(text, 40)} adds no token to prompt {quote(prompt)}"
                )
        if max_length is not None and len(full) > max_length:
            raise ValueError(
                f"prompt + {what} is {len(full)} tokens, longer than the model's context of "
                f"{max_length} tokens: {quote(prompt)}"
            )
        return rest

    feature_of = texts = None
    if spans is not None:
        source = text or prompt
        feature_of = _feature_of(tokenizer, source, offsets, special, spans)
        texts = [source[a:b] for a, b in spans]
    answer_ids = continuation(answer, "answer")
    foil_ids = continuation(foil, "foil") if foil is not None else None
    return Encoded(prompt_ids, special, offsets, answer_ids, foil_ids, spans, feature_of, texts)


def _feature_of(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    offsets: list[tuple[int, int]],
    special: list[bool],
    spans: list[Span],
) -> list[int]:
    """The feature of each prompt token (-1: special, or outside every span).

    Raises:
        ValueError: the tokenizer gives no character offsets, or a feature holds no token
            (its characters start no token: e.g. a span inside one token).
    """
    if not tokenizer.is_fast:
        raise ValueError(
            "features other than 'token' need a fast tokenizer (character offsets of tokens)"
        )
    of = [
        -1 if s else f for f, s in zip(token_features(text, offsets, spans), special, strict=True)
    ]
    held = set(of)
    for i, (start, end) in enumerate(spans):
        if i not in held:
            raise ValueError(
                f"feature {i} {quote(text[start:end], 40)} (characters {start}-{end}) holds no "
                "token of its own: a token belongs to the feature of its first non-space "
                "character; widen or merge the span"
            )
    return of


def collate(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Encoded]) -> TokenBatch:
    """Pad encoded examples into one :class:`TokenBatch` (prompts left, continuations right)."""
    if not examples:
        raise ValueError("no examples to collate")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    has_foil = examples[0].foil_ids is not None
    if any((e.foil_ids is not None) != has_foil for e in examples):
        raise ValueError("give a foil for every example or for none")
    prompt_width = max(len(e.prompt_ids) for e in examples)
    slot_width = max(
        max(len(e.answer_ids), len(e.foil_ids) if e.foil_ids is not None else 0) for e in examples
    )
    seq = prompt_width + slot_width
    # Rows built as lists, then one tensor each (one tensor op per row and field would cost
    # more than the model's forward on short batches).
    ids_rows, att_rows, feat_rows, ans_rows = [], [], [], []
    foil_rows: list[list[int]] = []
    foil_att_rows: list[list[int]] = []
    foil_mask_rows: list[list[bool]] = []
    tokens, token_ids, offsets, answer_tokens = [], [], [], []
    grouped = any(e.feature_of is not None for e in examples)
    fid_rows: list[list[int]] = []
    feature_texts: list[list[str]] = []
    feature_spans_: list[list[Span]] = []
    for e in examples:
        start = prompt_width - len(e.prompt_ids)
        n_ans = len(e.answer_ids)
        after = slot_width - n_ans
        ids_rows.append([pad] * start + e.prompt_ids + e.answer_ids + [pad] * after)
        att_rows.append([0] * start + [1] * (len(e.prompt_ids) + n_ans) + [0] * after)
        feat_rows.append([False] * start + [not s for s in e.special] + [False] * slot_width)
        ans_rows.append([False] * prompt_width + [True] * n_ans + [False] * after)
        if e.foil_ids is not None:
            n_foil = len(e.foil_ids)
            after_foil = slot_width - n_foil
            foil_rows.append([pad] * start + e.prompt_ids + e.foil_ids + [pad] * after_foil)
            foil_att_rows.append(
                [0] * start + [1] * (len(e.prompt_ids) + n_foil) + [0] * after_foil
            )
            foil_mask_rows.append([False] * prompt_width + [True] * n_foil + [False] * after_foil)
        keep = [i for i, s in enumerate(e.special) if not s]
        ids = [e.prompt_ids[i] for i in keep]
        token_ids.append(ids)
        tokens.append(tokenizer.convert_ids_to_tokens(ids))
        offsets.append([e.offsets[i] for i in keep])
        answer_tokens.append(tokenizer.convert_ids_to_tokens(e.answer_ids))
        if grouped:
            of = e.feature_of
            if of is None:  # single tokens, in a batch with grouped examples
                of, k = [], 0
                for sp in e.special:
                    of.append(-1 if sp else k)
                    k += not sp
            fid_rows.append([-1] * start + of + [-1] * slot_width)
        if e.spans is None:
            feature_texts.append(tokens[-1])
            feature_spans_.append(offsets[-1])
        else:
            feature_spans_.append(list(e.spans))
            feature_texts.append(list(e.feature_texts or []))
    input_ids = torch.tensor(ids_rows, dtype=torch.long).view(-1, seq)  # [batch, seq]
    attention_mask = torch.tensor(att_rows, dtype=torch.long).view(-1, seq)  # [batch, seq]
    feature_ids = torch.tensor(fid_rows, dtype=torch.long).view(-1, seq) if grouped else None
    if feature_ids is not None:
        feature_mask = feature_ids >= 0  # [batch, seq]
    else:
        feature_mask = torch.tensor(feat_rows, dtype=torch.bool).view(-1, seq)  # [batch, seq]
    answer_mask = torch.tensor(ans_rows, dtype=torch.bool).view(-1, seq)  # [batch, seq]
    foil_ids = torch.tensor(foil_rows, dtype=torch.long).view(-1, seq) if has_foil else None
    foil_attention_mask = (
        torch.tensor(foil_att_rows, dtype=torch.long).view(-1, seq) if has_foil else None
    )
    foil_mask = torch.tensor(foil_mask_rows, dtype=torch.bool).view(-1, seq) if has_foil else None
    # The foil's own positions: where it is longer than the answer, its last tokens sit where
    # the answer row has padding (and that padding's clamped positions would repeat).
    foil_position_ids = (
        position_ids_from(foil_attention_mask) if foil_attention_mask is not None else None
    )
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        feature_mask=feature_mask,
        answer_mask=answer_mask,
        foil_ids=foil_ids,
        foil_attention_mask=foil_attention_mask,
        foil_mask=foil_mask,
        foil_position_ids=foil_position_ids,
        prompt_width=prompt_width,
        tokens=tokens,
        token_ids=token_ids,
        offsets=offsets,
        answer_tokens=answer_tokens,
        feature_ids=feature_ids,
        features=feature_texts,
        spans=feature_spans_,
    )


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token: ``[0 0 0 1 2 …]`` for ``[0 0 1 1 1 …]``.

    Padding columns get a valid index (0 on the left, the last position on the right); they
    are masked out, so their value never matters.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
