"""Chat prompts: a list of ``{"role", "content"}`` messages rendered with the tokenizer's chat
template, with features taken from the contents of some roles only.

The template's own text (role markers, ``<|im_start|>``, the generation prompt) is context:
never a feature, never removed. Inside each message of a role in ``feature_roles`` the
features follow the granularity asked for (a token, word, sentence, line or separated part of
the content, or the whole content with ``"message"``), as character spans of the rendered
text, so the rest of tokattr sees an ordinary prompt with explicit spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from tokattr.features import NamedSpans, Span, feature_spans, token_features
from tokattr.messages import quote

DEFAULT_ROLES = ("user",)
"""The roles whose contents are features unless told otherwise."""


def is_chat(prompt: object) -> bool:
    """Whether ``prompt`` is one chat prompt: a non-empty sequence of mappings."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    features: str = "token",
    feature_roles: Sequence[str] = DEFAULT_ROLES,
) -> tuple[str, NamedSpans]:
    """The prompt text of ``messages`` (the chat template with ``add_generation_prompt=True``)
    and the character spans of its features.

    A leading BOS that the tokenizer adds by itself is left out of the text, so tokenizing
    the text as every prompt is tokenized gives the ids of ``apply_chat_template``.

    Args:
        features: the granularity inside each content: ``"token"`` (each token of the
            contents), ``"message"`` (each content whole), ``"word"``, ``"sentence"``,
            ``"line"`` or ``"separator:<s>"``.

    Raises:
        ValueError: the tokenizer has no chat template, a malformed message, a content the
            template does not reproduce, or no content in ``feature_roles``.
    """
    if not isinstance(features, str):
        raise ValueError(
            "features of a chat prompt must be a granularity name (token, message, word, "
            f"sentence, line, separator:<s>), got {quote(features, 40)}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a chat prompt (a list of messages) needs a tokenizer with a chat template; this "
            "one has none: pass the prompt as text, or set tokenizer.chat_template"
        )
    roles = tuple(feature_roles)
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(
                f"message {i} must have a string 'role' and a string 'content', got "
                f"{quote(dict(m), 60)}"
            )
    if not any(m["role"] in roles and m["content"].strip() for m in messages):
        present = sorted({m["role"] for m in messages})
        raise ValueError(
            f"no message of the roles {list(roles)} has content to attribute (the prompt's "
            f"roles: {present}); set feature_roles"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    contents: list[Span] = []
    spans: list[Span] = []
    at = 0
    for i, m in enumerate(messages):
        content = m["content"]
        start = text.find(content, at) if content else at
        if start < 0:
            raise ValueError(
                f"message {i}'s content {quote(content, 40)} is not in the rendered chat "
                "template (the template rewrites it), so its features cannot be located"
            )
        at = start + len(content)
        if m["role"] not in roles or not content.strip():
            continue
        contents.append((start, start + len(content)))
        if features in ("token", "message"):
            inner = [(0, len(content))]
        else:
            inner = feature_spans(content, features) or []
        spans += [(start + a, start + b) for a, b in inner if content[a:b].strip()]
    if features == "token":
        spans = _token_spans(tokenizer, text, contents)
    return text, NamedSpans(spans, f"chat:{features}")


def _token_spans(tokenizer: PreTrainedTokenizerBase, text: str, contents: list[Span]) -> list[Span]:
    """One span per token of ``text`` that belongs to a content (by its first non-space
    character), clipped to that content: single-token features inside the contents only."""
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    owner = token_features(text, enc["offset_mapping"], contents)
    out: list[Span] = []
    for (s, e), c, special in zip(
        enc["offset_mapping"], owner, enc["special_tokens_mask"], strict=True
    ):
        if c < 0 or special:
            continue
        lo, hi = contents[c]
        span = (max(s, lo), min(e, hi))
        if span[1] > span[0] and (not out or span[0] >= out[-1][1]):
            out.append(span)
    return out


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def chat_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: object,
    features: object,
    feature_roles: Sequence[str] = DEFAULT_ROLES,
) -> tuple[bool, object, object]:
    """Render every chat prompt among ``prompts`` (one prompt, or a list of text and chat
    prompts) and give it explicit spans from ``features`` (one granularity for all, or one
    per prompt). Returns whether one prompt was given, the prompts as text, and the
    features with each chat prompt's spans in place; text prompts pass through as they are.
    """
    single = isinstance(prompts, str) or is_chat(prompts)
    if isinstance(prompts, str | Mapping) or not isinstance(prompts, Sequence):
        return single, prompts, features
    items = [prompts] if single else list(prompts)
    if not any(is_chat(p) for p in items):
        return single, prompts, features
    if isinstance(features, str):
        specs = [features] * len(items)
    elif isinstance(features, Sequence) and len(features) == len(items):
        specs = list(features)
    else:
        raise ValueError(
            "with chat prompts, features must be one granularity name for all prompts or a "
            f"list with one per prompt ({len(items)})"
        )
    texts, out = [], []
    for i, (p, spec) in enumerate(zip(items, specs, strict=True)):
        if is_chat(p):
            try:
                text, spans = render_chat(tokenizer, p, spec, feature_roles)  # type: ignore[arg-type]
            except ValueError as err:
                raise ValueError(f"{'' if single else f'chat prompt {i}: '}{err}") from None
            texts.append(text)
            out.append(spans)
        else:
            texts.append(p)
            out.append(spec)
    if single:
        return True, texts[0], out[0]
    return False, texts, out
