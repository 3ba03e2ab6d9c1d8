"""Per-token role labels, derived from per-character roles through tokenizer offsets."""

from __future__ import annotations

from collections.abc import Sequence

from tokattr.data.arithmetic import (
    DECIMAL_POINT,
    DEMONSTRATION,
    EQUALS,
    FORMATTING,
    OPERAND,
    OPERATOR,
    SIGN,
    label_prompt,
)

# A token that spans characters of several roles (``▁+`` spans a space and an operator; a
# BPE token may span ``/-``) takes the first of its roles in this order.
_PRIORITY = (OPERAND, OPERATOR, SIGN, DECIMAL_POINT, EQUALS, FORMATTING, DEMONSTRATION)


def role_of_span(text: str, roles: Sequence[str], start: int, end: int) -> str:
    """The role of the token covering ``text[start:end]`` (see ``_PRIORITY``).

    Whitespace counts only when the token is nothing but whitespace (then ``formatting``,
    or ``demonstration`` inside a demonstration).
    """
    inside = [roles[i] for i in range(start, end) if not text[i].isspace()]
    if not inside:
        inside = [roles[i] for i in range(start, end)] or [FORMATTING]
    return min(inside, key=_PRIORITY.index)


def token_roles(offsets: Sequence[tuple[int, int]], text: str, roles: Sequence[str]) -> list[str]:
    """One role per token, from the token's character ``offsets`` into ``text``.

    ``offsets`` are those of the prompt's tokens only (no BOS or other special tokens).
    A zero-width token (e.g. a bare metaspace prepended at the start) is ``formatting``.
    """
    if len(roles) != len(text):
        raise ValueError(f"{len(roles)} roles for {len(text)} characters")
    return [role_of_span(text, roles, s, e) for s, e in offsets]


RELEVANT = frozenset({OPERAND, OPERATOR, SIGN, DECIMAL_POINT})
"""Roles of the tokens an arithmetic answer depends on (plausibility positives): an operand's
digits, sign and decimal point, and the operator; changing any of them changes the value."""
IRRELEVANT = frozenset({FORMATTING, DEMONSTRATION})
"""Roles of tokens that cannot change the answer (plausibility negatives): formatting (``$``,
thousands ``,``, spaces) and the solved demonstrations before the query. ``=`` is neither."""


def relevance(
    prompt: str, offsets: Sequence[tuple[int, int]], roles: Sequence[str] | None = None
) -> list[int] | None:
    """Ground truth per token for plausibility: 1 for the roles in :data:`RELEVANT`, 0 for
    those in :data:`IRRELEVANT`, -1 for ``=`` (the cue to answer, of neither kind).
    ``roles``: the prompt's per-character roles (from the generator); ``None``: parsed from
    the prompt, and ``None`` returned for a prompt the arithmetic parser does not read."""
    if roles is None:
        try:
            roles = label_prompt(prompt)
        except ValueError:
            return None
    return [
        1 if r in RELEVANT else 0 if r in IRRELEVANT else -1
        for r in token_roles(offsets, prompt, roles)
    ]
