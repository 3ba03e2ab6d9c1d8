"""Features other than tokens: the character spans of a prompt's words, sentences, lines or
separated parts, and which feature each token belongs to.

A feature is a character span of the prompt; removing it removes every token it holds.
Characters outside every span (the whitespace between words, a separator between
demonstrations) are context: never a feature, never removed. This is the grouping of Captum's
``TextTemplateInput`` and of context attribution (ContextCite, Cohen-Wang et al. 2024), made
from the prompt's text alone.

A token belongs to the feature that holds its first character that is not whitespace (a
byte-level BPE token such as ``" world"`` carries the space before its word, which is outside
the word's span); a token that is only whitespace takes its first character's feature, and a
token with no character in any feature is context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GRANULARITIES = ("token", "word", "sentence", "line")
"""The named granularities; ``"separator:<s>"`` and explicit spans are the other two forms."""

Span = tuple[int, int]

_SENTENCE = re.compile(r"\S.*?(?:[.!?]+(?=\s|\Z)|(?=\n[ \t]*\n)|\Z)", re.S)
# A sentence starts at a non-space and ends after a run of . ! ? followed by whitespace or the
# end (so "3.5" or "e.g" inside a word does not end it), or before a blank line.


def feature_spans(text: str, features: str | Sequence[Span]) -> list[Span] | None:
    """The character spans of ``text``'s features, in order.

    Args:
        features: ``"token"`` (``None`` is returned: every token is its own feature),
            ``"word"`` (runs of non-whitespace), ``"sentence"``, ``"line"`` (each non-empty
            line, without its line break), ``"separator:<s>"`` (the parts between occurrences
            of ``s``, e.g. ``"separator:;"`` between demonstrations; the separator itself is
            context), or explicit ``[(start, end), ...]`` character spans.

    Raises:
        ValueError: an unknown granularity, an empty separator, explicit spans out of range,
            empty, overlapping or out of order, or a text with no feature at all.
    """
    if isinstance(features, str):
        if features == "token":
            return None
        if features == "word":
            spans = [m.span() for m in re.finditer(r"\S+", text)]
        elif features == "sentence":
            spans = [_strip(text, m.span()) for m in _SENTENCE.finditer(text)]
        elif features == "line":
            spans = [_strip(text, m.span()) for m in re.finditer(r"[^\r\n]+", text)]
        elif features.startswith("separator:"):
            sep = features[len("separator:") :]
            if not sep:
                raise ValueError("features='separator:<s>' needs a non-empty separator")
            spans, start = [], 0
            for m in re.finditer(re.escape(sep), text):
                spans.append(_strip(text, (start, m.start())))
                start = m.end()
            spans.append(_strip(text, (start, len(text))))
        else:
            raise ValueError(
                f"unknown features {features!r}; choose from {list(GRANULARITIES)}, "
                "'separator:<s>' or a list of (start, end) character spans"
            )
        spans = [s for s in spans if s[1] > s[0]]
    else:
        spans = check_spans(text, features)
    if not spans:
        raise ValueError(f"features={features!r}: the prompt has no feature (only whitespace)")
    return spans


class NamedSpans(list):
    """Explicit spans that carry the name of the granularity they were made from (e.g. the
    sentences of a chat prompt's user messages, ``"chat:sentence"``)."""

    def __init__(self, spans: Sequence[Span], name: str) -> None:
        super().__init__(spans)
        self.name = name


def granularity_of(features: str | Sequence[Span]) -> str:
    """The name of a feature specification: the granularity's name, or ``"spans"``."""
    if isinstance(features, str):
        return features
    return getattr(features, "name", "spans")


def is_spans(value: object) -> bool:
    """Whether ``value`` looks like explicit spans (a sequence of pairs), not a list of
    specifications."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        return False
    first = value[0]
    return (
        isinstance(first, Sequence)
        and not isinstance(first, str)
        and len(first) == 2
        and all(isinstance(v, int) for v in first)
    )


def check_spans(text: str, spans: Sequence[Span]) -> list[Span]:
    """Explicit spans as a list of ``(start, end)`` int pairs, each inside ``text``, non-empty,
    in order and not overlapping.

    Raises:
        ValueError: the first span that breaks a rule, named with its index.
    """
    out: list[Span] = []
    for i, span in enumerate(spans):
        try:
            start, end = span
        except (TypeError, ValueError):
            raise ValueError(
                f"feature span {i} must be a (start, end) pair, got {span!r}"
            ) from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise ValueError(f"feature span {i} must hold integers, got {span!r}")
        if not 0 <= start < end <= len(text):
            raise ValueError(
                f"feature span {i} ({start}, {end}) must satisfy 0 <= start < end <= "
                f"{len(text)} (the prompt's length in characters)"
            )
        if out and start < out[-1][1]:
            raise ValueError(
                f"feature span {i} ({start}, {end}) overlaps or precedes span {i - 1} "
                f"{out[-1]}: spans must be in order and disjoint"
            )
        out.append((start, end))
    return out


def token_features(text: str, offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """For each token (its character ``offsets`` into ``text``), the index of the span it
    belongs to, or ``-1`` for context (see the module's rule)."""
    owner = [-1] * len(text)
    for f, (start, end) in enumerate(spans):
        owner[start:end] = [f] * (end - start)
    out = []
    for start, end in offsets:
        chars = range(start, min(end, len(text)))
        first = next((c for c in chars if not text[c].isspace()), chars.start)
        out.append(owner[first] if first < min(end, len(text)) else -1)
    return out


def _strip(text: str, span: Span) -> Span:
    """``span`` without the whitespace at either end."""
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
