"""The kinds of query (*buckets*) the arithmetic generator draws, one sampler each.

:data:`BUCKETS` maps a bucket's name to its sampler; :data:`DEFAULT_MIX` is the training
mix over them; :func:`sample_query` spells one query of a bucket and solves it. The
generator (:class:`tokattr.data.arithmetic.ArithmeticGenerator`) picks the buckets.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

from tokattr.data.numbers import apply, format_number, spell_operand

# Samplers: each returns (a, op, b, spelled_a, spelled_b) for one query. Operand sizes are
# drawn digit-count first so short and long operands are equally common.


def _int_digits(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    n = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def _one_decimal(rng: random.Random, hi_digits: int = 2) -> Fraction:
    whole = _int_digits(rng, 1, hi_digits)
    return Fraction(whole * 10 + rng.randint(1, 9), 10)


Sampled = tuple[Fraction, str, Fraction, str, str]


def _plain(a: int | Fraction, op: str, b: int | Fraction) -> Sampled:
    a, b = Fraction(a), Fraction(b)
    return a, op, b, spell_operand(a), spell_operand(b)


def sample_add(rng: random.Random) -> Sampled:
    """Integer ``+``, operands of 1 to 3 digits."""
    return _plain(_int_digits(rng, 1, 3), "+", _int_digits(rng, 1, 3))


def sample_sub(rng: random.Random) -> Sampled:
    """Integer ``-``, operands of 1 to 3 digits; the result may be negative."""
    return _plain(_int_digits(rng, 1, 3), "-", _int_digits(rng, 1, 3))


def sample_mul_1x2(rng: random.Random) -> Sampled:
    """``x`` with a 1-digit operand and a 1–2 digit operand, in either order."""
    a, b = _int_digits(rng, 1, 1), _int_digits(rng, 1, 2)
    return _plain(a, "x", b) if rng.random() < 0.5 else _plain(b, "x", a)


def sample_mul_2x2(rng: random.Random) -> Sampled:
    """``x`` with two 2-digit operands."""
    return _plain(_int_digits(rng, 2, 2), "x", _int_digits(rng, 2, 2))


def sample_div(rng: random.Random) -> Sampled:
    """Exact ``/`` with a 1–2 digit answer and a 1–2 digit divisor (dividend = product)."""
    q, d = _int_digits(rng, 1, 2), rng.randint(1, 99)
    return _plain(q * d, "/", d)


def sample_currency(rng: random.Random) -> Sampled:
    """``$`` amounts with thousands separators, ``+`` or ``-``: ``$1,250+$300=1550``."""
    a = rng.randint(1000, 9999)
    b = _int_digits(rng, 1, 4)
    if rng.random() < 0.5:
        a, b = b, a
    op = rng.choice("+-")
    sa = spell_operand(a, currency=True, separators=True)
    sb = spell_operand(b, currency=rng.random() < 0.6, separators=True)
    return Fraction(a), op, Fraction(b), sa, sb


def sample_spaces(rng: random.Random) -> Sampled:
    """A plain problem of any operation; the spaces are added by the caller."""
    return rng.choice((sample_add, sample_sub, sample_mul_1x2, sample_div))(rng)


def sample_decimal(rng: random.Random) -> Sampled:
    """One-decimal operands: ``2.5+13.7=16.2``, ``4.5-7.2=-2.7``, ``0.8x5=4``.

    For ``+`` and ``-`` each operand is one-decimal with probability 0.8 (else an integer of
    1–2 digits), so about 4% of them mix no decimals in; ``x`` always has one.
    """
    op = rng.choice("+-x")
    if op == "x":
        a, b = _one_decimal(rng, 1), Fraction(_int_digits(rng, 1, 1))
        if rng.random() < 0.5:
            a, b = b, a
        return _plain(a, op, b)
    a = _one_decimal(rng) if rng.random() < 0.8 else Fraction(_int_digits(rng, 1, 2))
    b = _one_decimal(rng) if rng.random() < 0.8 else Fraction(_int_digits(rng, 1, 2))
    return _plain(a, op, b)


def sample_negative(rng: random.Random) -> Sampled:
    """Negative operands with any operation: ``86+-31=55``, ``-48/6=-8``, ``-7x-9=63``."""
    base = rng.choice((sample_add, sample_sub, sample_mul_1x2, sample_div))
    a, op, b, _, _ = base(rng)
    flip = rng.choice(("a", "b", "ab"))
    a = -a if "a" in flip and a != 0 else a
    b = -b if "b" in flip and b != 0 else b
    if a >= 0 and b >= 0:  # a zero operand could not take the sign: put it on the other
        if a != 0:
            a = -a
        elif b != 0:
            b = -b
    return _plain(a, op, b)


def sample_seed_like(rng: random.Random) -> Sampled:
    """The seed figure's shape ``$A/-0.B=``: ``$16,000/-0.8=-20000``.

    The answer is ``-q`` followed by 2 or 3 zeros (``q`` of 0–99), so the dividend
    ``A = 0.B x q x 10^z`` is a whole dollar amount (``$0/-0.5=0`` when ``q`` is 0).
    """
    digit = rng.randint(1, 9)
    answer = -Fraction(_int_digits(rng, 1, 2) * 10 ** rng.randint(2, 3))
    divisor = -Fraction(digit, 10)
    a = answer * divisor
    return a, "/", divisor, spell_operand(a, currency=True, separators=True), "-0." + str(digit)


BUCKETS: dict[str, Callable[[random.Random], Sampled]] = {
    "add": sample_add,
    "sub": sample_sub,
    "mul_1x2": sample_mul_1x2,
    "mul_2x2": sample_mul_2x2,
    "div": sample_div,
    "currency": sample_currency,
    "spaces": sample_spaces,
    "decimal": sample_decimal,
    "negative": sample_negative,
    "seed_like": sample_seed_like,
}
"""Kinds of query. The first five are plain; the last five are the *formatted* buckets."""

FORMATTED_BUCKETS = ("currency", "spaces", "decimal", "negative", "seed_like")

DEFAULT_MIX: dict[str, float] = {
    "add": 0.09,
    "sub": 0.09,
    "mul_1x2": 0.08,
    "mul_2x2": 0.2,
    "div": 0.12,
    "currency": 0.1,
    "spaces": 0.06,
    "decimal": 0.1,
    "negative": 0.08,
    "seed_like": 0.08,
}
"""Training mix over :data:`BUCKETS` (weights; normalised when sampled)."""


def sample_query(rng: random.Random, bucket: str) -> tuple[str, str]:
    """One unsolved query of ``bucket`` and its canonical answer: ``('9+3=', '12')``."""
    if bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}; choose from {sorted(BUCKETS)}")
    a, op, b, sa, sb = BUCKETS[bucket](rng)
    query = f"{sa} {op} {sb} = " if bucket == "spaces" else f"{sa}{op}{sb}="
    return query, format_number(apply(op, a, b))
