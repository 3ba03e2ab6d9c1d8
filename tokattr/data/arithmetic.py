"""Arithmetic problems whose structure is known character by character.

A *problem* is a prompt ending in ``=`` and a canonical answer, e.g. ``$16,000/-0.8=`` and
``-20000``. Optional solved *demonstrations* come before the query, joined by ``;``
(``9 + 3 = 12;7 x 5 = 35;$16,000/-0.8=``). Every prompt character carries a *role*
(:data:`ROLES`), from which token labels are derived for any tokenizer through offsets
(:func:`tokattr.data.labels.token_roles`).

Roles come from one parser, :func:`label_prompt`, which the generator also uses, so a prompt
read from a JSONL file (:mod:`tokattr.data.jsonl`) gets the same labels as a generated one.

Answers are canonical numbers (:mod:`tokattr.data.numbers`); the kinds of query the
generator draws are :mod:`tokattr.data.buckets`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from tokattr.data.buckets import BUCKETS, DEFAULT_MIX, sample_query
from tokattr.data.numbers import OPERATORS, apply, format_number, parse_number

OPERAND = "operand"  # a digit of an operand
OPERATOR = "operator"  # + - x /
SIGN = "sign"  # the minus of a negative operand
DECIMAL_POINT = "decimal_point"
FORMATTING = "formatting"  # '$', thousands ',', spaces
EQUALS = "equals"
DEMONSTRATION = "demonstration"  # every character of a solved example, and its ';'
ROLES: tuple[str, ...] = (OPERAND, OPERATOR, SIGN, DECIMAL_POINT, FORMATTING, EQUALS, DEMONSTRATION)

SEPARATOR = ";"

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
    features: str | tuple[tuple[int, int], ...] | None = None  # a JSONL line's "features"
    sources: tuple[int, ...] | None = None  # a JSONL line's "sources": features it depends on

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
