"""The numbers of arithmetic prompts: canonical spelling, parsing and exact arithmetic.

Values are :class:`~fractions.Fraction`, so every answer is exact. Answers are canonical
(:func:`format_number`): an optional ``-``, digits, and an optional ``.digits`` with no
trailing zeros; never ``$`` or ``,``. Operands may be spelled with ``$`` and thousands
separators (:func:`spell_operand`), which :func:`parse_number` reads back.
"""

from __future__ import annotations

import re
from fractions import Fraction

OPERATORS = ("+", "-", "x", "/")


def format_number(value: Fraction | int) -> str:
    """Canonical decimal spelling of a terminating number: ``-20000``, ``7.5``, ``0.25``.

    Raises ``ValueError`` for a value with no finite decimal expansion (e.g. 1/3).
    """
    value = Fraction(value)
    sign = "-" if value < 0 else ""
    value = abs(value)
    den = value.denominator
    # A fraction terminates in base 10 iff its reduced denominator is 2^a 5^b.
    d, scale = den, 0
    while d % 2 == 0 or d % 5 == 0:
        d //= 2 if d % 2 == 0 else 5
    if d != 1:
        raise ValueError(f"{value} has no finite decimal expansion")
    while (value * 10**scale).denominator != 1:
        scale += 1
    digits = str((value * 10**scale).numerator)
    if scale:
        digits = digits.rjust(scale + 1, "0")
        digits = f"{digits[:-scale]}.{digits[-scale:]}".rstrip("0").rstrip(".")
    return sign + digits if digits != "0" else "0"


def spell_operand(
    value: Fraction | int, *, currency: bool = False, separators: bool = False
) -> str:
    """Spell an operand: ``-0.8``, ``$16,000`` (currency with thousands separators)."""
    text = format_number(value)
    sign = ""
    if text.startswith("-"):
        sign, text = "-", text[1:]
    if separators:
        whole, dot, frac = text.partition(".")
        whole = f"{int(whole):,}"
        text = whole + dot + frac
    return sign + ("$" if currency else "") + text


def parse_number(text: str) -> Fraction:
    """Inverse of :func:`spell_operand`: ``'$16,000'`` -> 16000, ``'-0.8'`` -> -4/5."""
    cleaned = text.replace("$", "").replace(",", "").strip()
    if not re.fullmatch(r"-?\d+(\.\d+)?", cleaned):
        raise ValueError(f"not a number: {text!r}")
    return Fraction(cleaned)


def apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    """The value of ``a op b``; ``/`` must divide exactly into a terminating decimal."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "x":
        return a * b
    if op == "/":
        if b == 0:
            raise ZeroDivisionError("division by zero")
        return a / b
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")
