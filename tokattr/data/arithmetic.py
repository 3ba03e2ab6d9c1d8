"""Arithmetic problems whose structure is known character by character.

A *problem* is a prompt ending in ``=`` and a canonical answer, e.g. ``$16,000/-0.8=`` and
``-20000``. Optional solved *demonstrations* come before the query, joined by ``;``
(``9 + 3 = 12;7 x 5 = 35;$16,000/-0.8=``). Every prompt character carries a *role*
(:data:`ROLES`), from which token labels are derived for any tokenizer through offsets
(:func:`tokattr.data.labels.token_roles`).

Roles come from one parser, :func:`label_prompt`, which the generator also uses, so a prompt
read from a JSONL file gets the same labels as a generated one.

Answers are canonical numbers (:func:`format_number`): an optional ``-``, digits, and an
optional ``.digits`` with no trailing zeros; never ``$`` or ``,``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

# --------------------------------------------------------------------------- roles

OPERAND = "operand"  # a digit of an operand
OPERATOR = "operator"  # + - x /
SIGN = "sign"  # the minus of a negative operand
DECIMAL_POINT = "decimal_point"
FORMATTING = "formatting"  # '$', thousands ',', spaces
EQUALS = "equals"
DEMONSTRATION = "demonstration"  # every character of a solved example, and its ';'
ROLES: tuple[str, ...] = (OPERAND, OPERATOR, SIGN, DECIMAL_POINT, FORMATTING, EQUALS, DEMONSTRATION)

OPERATORS = ("+", "-", "x", "/")
SEPARATOR = ";"

# --------------------------------------------------------------------------- numbers


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


# --------------------------------------------------------------------------- the parser

# One operand: optional sign, optional '$', digits with optional thousands separators,
# optional one-or-more decimals.
_OPERAND = r"-?\$?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\$?\d+(?:\.\d+)?"
_PROBLEM = re.compile(
    rf"^(?P<s0> *)(?P<a>{_OPERAND})(?P<s1> *)(?P<op>[-+x/])(?P<s2> *)(?P<b>{_OPERAND})"
    rf"(?P<s3> *)=(?P<s4> *)$"
)


@dataclass(frozen=True)
class ParsedProblem:
    """A query parsed into operands and operator, with its value (None if not exact)."""

    a: Fraction
    op: str
    b: Fraction
    value: Fraction | None


def parse_query(query: str) -> tuple[ParsedProblem, tuple[str, ...]]:
    """Parse one unsolved problem (``'$16,000/-0.8='``) into its parts and per-char roles.

    Raises ``ValueError`` naming the problem if the text is not ``operand op operand =``.
    """
    m = _PROBLEM.match(query)
    if m is None:
        raise ValueError(
            f"not an arithmetic query of the form 'a op b =' with op in {OPERATORS}: {query!r}"
        )
    roles: list[str] = []
    for group in ("s0", "a", "s1", "op", "s2", "b", "s3"):
        text = m.group(group)
        if group in ("a", "b"):
            roles.extend(_operand_roles(text))
        elif group == "op":
            roles.append(OPERATOR)
        else:
            roles.extend(FORMATTING for _ in text)
    roles.append(EQUALS)
    roles.extend(FORMATTING for _ in m.group("s4"))
    a, b, op = parse_number(m.group("a")), parse_number(m.group("b")), m.group("op")
    try:
        value: Fraction | None = apply(op, a, b)
        format_number(value)
    except (ZeroDivisionError, ValueError):
        value = None
    return ParsedProblem(a, op, b, value), tuple(roles)


def _operand_roles(text: str) -> list[str]:
    roles = []
    for ch in text:
        if ch.isdigit():
            roles.append(OPERAND)
        elif ch == "-":
            roles.append(SIGN)
        elif ch == ".":
            roles.append(DECIMAL_POINT)
        else:  # '$' and ','
            roles.append(FORMATTING)
    return roles


def label_prompt(prompt: str) -> tuple[str, ...]:
    """One role per character of ``prompt`` (demonstrations, then a query ending in ``=``).

    Everything before the last ``;`` — the solved demonstrations and their separators — is
    labelled ``demonstration``; the query after it is parsed by :func:`parse_query`.
    """
    head, sep, query = prompt.rpartition(SEPARATOR)
    _, query_roles = parse_query(query)
    return (DEMONSTRATION,) * (len(head) + len(sep)) + query_roles


def solve(prompt: str) -> str:
    """The canonical answer to the query at the end of ``prompt``."""
    parsed, _ = parse_query(prompt.rpartition(SEPARATOR)[2])
    if parsed.value is None:
        raise ValueError(f"{prompt!r} has no exact terminating answer")
    return format_number(parsed.value)


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ArithmeticProblem:
    """One example: ``prompt`` (demonstrations + query) and its canonical ``answer``.

    ``roles`` has one entry per character of ``prompt`` (see :data:`ROLES`), or is ``None``
    for a prompt that is not arithmetic; ``bucket`` names the kind of query (see
    :data:`BUCKETS`), or ``"jsonl"`` for problems read from a file.
    """

    id: str
    prompt: str
    answer: str | None  # None: not given (a non-arithmetic prompt read from a file)
    roles: tuple[str, ...] | None
    bucket: str
    line: int | None = None  # line of the JSONL file it was read from

    def __post_init__(self) -> None:
        if self.roles is not None and len(self.roles) != len(self.prompt):
            raise ValueError(
                f"{self.id}: {len(self.roles)} roles for a prompt of {len(self.prompt)} chars"
            )


def make_problem(id: str, prompt: str, answer: str | None = None, bucket: str = "jsonl"):
    """Build an :class:`ArithmeticProblem`, labelling the prompt and checking the answer.

    ``answer=None`` solves an arithmetic prompt; any other prompt keeps ``answer=None`` (the
    model's greedy answer is then attributed). A given answer is kept as it is (it may be a
    deliberate foil, or the prompt may not be arithmetic at all, in which case ``roles`` is
    ``None``).
    """
    if not isinstance(prompt, str):
        raise ValueError(f'"prompt" must be a string, got {type(prompt).__name__}')
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f'"answer" must be a string, got {type(answer).__name__}')
    if not prompt or not prompt.strip():
        raise ValueError(f"{id}: empty prompt")
    try:
        roles: tuple[str, ...] | None = label_prompt(prompt)
    except ValueError:
        roles = None
    if answer is None and roles is not None:
        answer = solve(prompt)
    if answer is not None and not answer:
        raise ValueError(f"{id}: empty answer")
    return ArithmeticProblem(id=id, prompt=prompt, answer=answer, roles=roles, bucket=bucket)


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


def _check_mix(mix: Mapping[str, float]) -> tuple[list[str], list[float]]:
    unknown = sorted(set(mix) - set(BUCKETS))
    if unknown:
        raise ValueError(f"unknown buckets {unknown}; choose from {sorted(BUCKETS)}")
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix weights must be non-negative with a positive sum: {dict(mix)}")
    return list(mix), list(mix.values())


class ArithmeticGenerator:
    """Seeded stream of :class:`ArithmeticProblem`.

    Args:
        seed: the stream is a pure function of the seed (problem ``i`` of seed ``s`` is the
            same on every machine and in every process).
        mix: bucket weights for the query (default :data:`DEFAULT_MIX`), or one bucket name.
        demonstrations: ``(lo, hi)`` solved examples before the query, drawn uniformly.
        demo_mix: bucket weights for demonstrations (default: ``mix``).
    """

    def __init__(
        self,
        seed: int = 0,
        mix: Mapping[str, float] | str | None = None,
        demonstrations: tuple[int, int] = (0, 0),
        demo_mix: Mapping[str, float] | None = None,
    ) -> None:
        if isinstance(mix, str):
            mix = {mix: 1.0}
        self.seed = seed
        self.buckets, self.weights = _check_mix(mix or DEFAULT_MIX)
        self.demo_buckets, self.demo_weights = _check_mix(
            demo_mix or dict(zip(self.buckets, self.weights, strict=True))
        )
        lo, hi = demonstrations
        if not 0 <= lo <= hi:
            raise ValueError(
                f"demonstrations must be (lo, hi) with 0 <= lo <= hi, got {demonstrations}"
            )
        self.demonstrations = (lo, hi)

    def problem(self, index: int) -> ArithmeticProblem:
        """Problem number ``index`` of this stream."""
        rng = random.Random(f"{self.seed}:{index}")
        bucket = rng.choices(self.buckets, self.weights)[0]
        demos = []
        for _ in range(rng.randint(*self.demonstrations)):
            q, a = sample_query(rng, rng.choices(self.demo_buckets, self.demo_weights)[0])
            demos.append(q + a)
        query, answer = sample_query(rng, bucket)
        prompt = SEPARATOR.join([*demos, query])
        return ArithmeticProblem(
            id=f"s{self.seed}-{index}",
            prompt=prompt,
            answer=answer,
            roles=label_prompt(prompt),
            bucket=bucket,
        )

    def take(self, n: int, start: int = 0) -> list[ArithmeticProblem]:
        """Problems ``start .. start+n-1``."""
        return [self.problem(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[ArithmeticProblem]:
        i = 0
        while True:
            yield self.problem(i)
            i += 1


def with_demonstrations(demonstrations: Sequence[str], query: str) -> str:
    """Join solved demonstrations and a query the way the data set does (``;``)."""
    for d in demonstrations:
        if SEPARATOR in d:
            raise ValueError(f"a demonstration may not contain {SEPARATOR!r}: {d!r}")
    return SEPARATOR.join([*demonstrations, query])


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> list[ArithmeticProblem]:
    """Read problems from a JSONL file of ``{"id", "prompt", "answer"}`` objects.

    ``answer`` may be omitted: an arithmetic prompt is then solved, any other prompt keeps
    ``answer=None`` (the model's greedy answer is attributed); prompts that are not arithmetic
    get no roles. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}); a JSONL file is one JSON object "
            "per line"
        ) from None
    problems, seen = [], set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f'{where}: expected an object with "id", "prompt", "answer"')
        pid = str(row.get("id", lineno - 1))
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        try:
            problem = make_problem(pid, row["prompt"], row.get("answer"))
            problems.append(dataclasses.replace(problem, line=lineno))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems
