"""Key-value lookup: a long context whose answer comes from one known part of it.

A prompt lists ``n`` definitions ``<key><value>`` joined by ``;`` and ends with a query, a
key alone; the answer is that key's value::

    k4;B0;x9;...;q1;B   ->   0

Keys are distinct letters (``a``-``z``, ``A``-``Z``), values one digit, so a query is
answered by finding the key and copying the token after it: the induction-head pattern of
Olsson et al. (2022), the simplest form of the lookup.

Every definition is a *segment* (its character span, without the ``;``), and the answer
depends on exactly one of them, the *source*: the ground truth that context attribution needs
(which part of the context did the answer come from?) and that arithmetic prompts cannot
give, where every token matters a little. Several definitions share a value (ten digits), so
only the key tells the source. With 20 to 52 definitions a prompt is 61 to 157 tokens of the
bundled tokenizer (one token per character).

:class:`LookupGenerator` with a seed not used in training gives fresh problems
(``TRAIN_SEEDS`` are those of ``configs/train/lookup_tiny*.yaml``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

SEPARATOR = ";"
QUERY = ""
KEYS = string.ascii_lowercase + string.ascii_uppercase
TRAIN_SEEDS = (0, 1)
"""Seeds of the bundled model's training stream and of its validation set."""


@dataclass(frozen=True)
class LookupProblem:
    """One lookup prompt, its answer, the spans of its definitions and which one answers it.

    ``segments`` are ``(start, end)`` character spans of every definition in ``prompt``;
    ``sources`` the indices (into ``segments``) of those the answer depends on.
    """

    id: str
    prompt: str
    answer: str
    segments: tuple[tuple[int, int], ...]
    sources: tuple[int, ...]
    bucket: str = "lookup"


class LookupGenerator:
    """Seeded stream of :class:`LookupProblem` (problem ``i`` of seed ``s`` is the same
    everywhere).

    Args:
        seed: the stream's seed.
        pairs: ``(lo, hi)`` definitions per prompt, drawn uniformly (at most 52, the number of
            distinct keys).
    """

    def __init__(self, seed: int = 0, pairs: tuple[int, int] = (20, 52)) -> None:
        lo, hi = pairs
        if not 1 <= lo <= hi <= len(KEYS):
            raise ValueError(
                f"pairs must be (lo, hi) with 1 <= lo <= hi <= {len(KEYS)}, got {pairs}"
            )
        self.seed = seed
        self.pairs = (lo, hi)

    def definitions(self, index: int) -> tuple[list[tuple[str, str]], random.Random]:
        """Problem ``index``'s ``(key, value)`` definitions, and its RNG after drawing them."""
        rng = random.Random(f"lookup:{self.seed}:{index}")
        n = rng.randint(*self.pairs)
        keys = rng.sample(KEYS, n)
        return [(k, str(rng.randrange(10))) for k in keys], rng

    def problem(self, index: int) -> LookupProblem:
        """Problem number ``index`` of this stream."""
        defs, rng = self.definitions(index)
        source = rng.randrange(len(defs))
        context, segments = layout(defs)
        key, value = defs[source]
        return LookupProblem(
            id=f"lookup-s{self.seed}-{index}",
            prompt=f"{context}{SEPARATOR}{key}{QUERY}",
            answer=value,
            segments=segments,
            sources=(source,),
        )

    def take(self, n: int, start: int = 0) -> list[LookupProblem]:
        """Problems ``start .. start+n-1``."""
        return [self.problem(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[LookupProblem]:
        i = 0
        while True:
            yield self.problem(i)
            i += 1


def layout(defs: list[tuple[str, str]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The definitions joined by ``;``, and each one's character span."""
    text, spans = "", []
    for key, value in defs:
        if text:
            text += SEPARATOR
        spans.append((len(text), len(text) + len(key) + len(value)))
        text += f"{key}{value}"
    return text, tuple(spans)
