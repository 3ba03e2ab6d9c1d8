"""How error messages quote user input: an error names its problem in one short line, quoting
a few dozen characters of a prompt at most, whatever the prompt's length."""

from __future__ import annotations

QUOTE_CHARS = 80
"""Error messages quote at most this many characters of a prompt or answer."""


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(text)``, or for a longer string its start and end around ``…`` and its length,
    so that an error about a 5,000-character prompt stays one short line."""
    if not isinstance(text, str):
        shown = repr(text)
        return shown if len(shown) <= limit else shown[: limit - 1] + "…"
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return f"{text[:half]!r}…{text[-half:]!r} ({len(text):,} characters)"


def no_room(prompt: str, n_tokens: int, limit: int, name: str | None = None) -> str | None:
    """Why a prompt of ``n_tokens`` tokens cannot be attributed in a model context of ``limit``
    (no room left for an answer), or ``None`` when it can: the one message for every place that
    checks it before any work (``name``: the example's id, where there is one)."""
    if n_tokens < limit:
        return None
    return (
        f"prompt{'' if name is None else ' ' + repr(name)} is {n_tokens} tokens, and the "
        f"model's context of {limit} leaves no room for an answer: {quote(prompt)}"
    )
