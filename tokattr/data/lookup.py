"""Key-value lookup: a long context whose answer comes from one known part of it.

A prompt lists ``n`` definitions ``<key><value>`` and passages of filler, joined by ``;``, and
ends with a query, a key alone; the answer is that key's value::

    k4;B0;80257713;x9;...;q1;3306;B   ->   0

Keys are distinct letters (``a``-``z``, ``A``-``Z``), values one digit, so a query is
answered by finding the key and copying the token after it: the induction-head pattern of
Olsson et al. (2022), the simplest form of the lookup. The filler passages are digits only:
they hold no key, so the answer never depends on them, and they make the context as long as a
real one (``length``), the way retrieved passages surround the one that answers (the
"needle in a haystack" of long-context evaluations).

Every definition and every filler passage is a *segment* (its character span, without the
``;``), and the answer depends on exactly one of them, the *source*: the ground truth that
context attribution needs (which part of the context did the answer come from?) and that
arithmetic prompts cannot give, where every token matters a little. Several definitions share
a value (ten digits), so only the key tells the source. The bundled tokenizer spells one
token per character, so a prompt's length in characters is its length in tokens (the ``<s>``
aside): by default 100 to 400.

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
FILLER_CHARS = string.digits
"""What filler passages are made of: no key among them, so no passage can answer a query."""
TRAIN_SEEDS = (0, 1)
"""Seeds of the bundled model's training stream and of its validation set."""


@dataclass(frozen=True)
class LookupProblem:
    """One lookup prompt, its answer, the spans of its parts and which one answers it.

    ``segments`` are ``(start, end)`` character spans, in prompt order, of every definition
    and filler passage in ``prompt``; ``definitions`` the indices (into ``segments``) of the
    definitions; ``sources`` those of the segments the answer depends on.
    """

    id: str
    prompt: str
    answer: str
    segments: tuple[tuple[int, int], ...]
    sources: tuple[int, ...]
    definitions: tuple[int, ...] = ()
    bucket: str = "lookup"


@dataclass(frozen=True)
class LookupContext:
    """A lookup context before its query: the text and every part's span."""

    text: str
    segments: tuple[tuple[int, int], ...]
    definitions: tuple[int, ...]
    """Index into ``segments`` of each definition, in the order of the ``defs`` given."""


class LookupGenerator:
    """Seeded stream of :class:`LookupProblem` (problem ``i`` of seed ``s`` is the same
    everywhere).

    Args:
        seed: the stream's seed.
        pairs: ``(lo, hi)`` definitions per prompt, drawn uniformly (at most 52, the number of
            distinct keys).
        length: ``(lo, hi)`` characters per prompt (tokens of the bundled tokenizer), drawn
            uniformly; filler passages are added at random places between the definitions
            until the prompt has that length (none where the definitions and the query alone
            are longer). ``None``: no filler, the definitions only.
        filler: ``(lo, hi)`` digits per filler passage, drawn uniformly (the last one is cut
            to the length drawn, so it may be shorter).
    """

    def __init__(
        self,
        seed: int = 0,
        pairs: tuple[int, int] = (20, 52),
        length: tuple[int, int] | None = (100, 400),
        filler: tuple[int, int] = (8, 48),
    ) -> None:
        lo, hi = pairs
        if not 1 <= lo <= hi <= len(KEYS):
            raise ValueError(
                f"pairs must be (lo, hi) with 1 <= lo <= hi <= {len(KEYS)}, got {pairs}"
            )
        if length is not None and not 1 <= length[0] <= length[1]:
            raise ValueError(f"length must be (lo, hi) with 1 <= lo <= hi, or None, got {length}")
        if not 1 <= filler[0] <= filler[1]:
            raise ValueError(f"filler must be (lo, hi) with 1 <= lo <= hi, got {filler}")
        self.seed = seed
        self.pairs = (lo, hi)
        self.length = None if length is None else (int(length[0]), int(length[1]))
        self.filler = (int(filler[0]), int(filler[1]))

    def definitions(self, index: int) -> tuple[list[tuple[str, str]], random.Random]:
        """Problem ``index``'s ``(key, value)`` definitions, and its RNG after drawing them."""
        rng = random.Random(f"lookup:{self.seed}:{index}")
        n = rng.randint(*self.pairs)
        keys = rng.sample(KEYS, n)
        return [(k, str(rng.randrange(10))) for k in keys], rng

    def context(
        self, defs: list[tuple[str, str]], rng: random.Random, reserve: int = 0
    ) -> LookupContext:
        """The context of ``defs`` with filler drawn from ``rng`` up to the drawn length, less
        ``reserve`` characters kept for what follows it (the query)."""
        parts = [k + v for k, v in defs]
        is_def = [True] * len(parts)
        if self.length is not None:
            room = rng.randint(*self.length) - reserve - len(SEPARATOR.join(parts))
            while room > len(SEPARATOR):
                size = min(rng.randint(*self.filler), room - len(SEPARATOR))
                if room - size - len(SEPARATOR) == 1:  # a single character left: no passage
                    size += 1 if size < self.filler[1] or size == 1 else -1
                at = rng.randrange(len(parts) + 1)
                parts.insert(at, "".join(rng.choice(FILLER_CHARS) for _ in range(size)))
                is_def.insert(at, False)
                room -= size + len(SEPARATOR)
        text, spans = layout(parts)
        return LookupContext(
            text=text,
            segments=spans,
            definitions=tuple(i for i, d in enumerate(is_def) if d),
        )

    def problem(self, index: int) -> LookupProblem:
        """Problem number ``index`` of this stream."""
        defs, rng = self.definitions(index)
        source = rng.randrange(len(defs))
        key, value = defs[source]
        query = f"{SEPARATOR}{key}{QUERY}"
        ctx = self.context(defs, rng, reserve=len(query))
        return LookupProblem(
            id=f"lookup-s{self.seed}-{index}",
            prompt=ctx.text + query,
            answer=value,
            segments=ctx.segments,
            sources=(ctx.definitions[source],),
            definitions=ctx.definitions,
        )

    def take(self, n: int, start: int = 0) -> list[LookupProblem]:
        """Problems ``start .. start+n-1``."""
        return [self.problem(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[LookupProblem]:
        i = 0
        while True:
            yield self.problem(i)
            i += 1


def layout(parts: list[str]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The parts joined by ``;``, and each one's character span."""
    text, spans = "", []
    for part in parts:
        if text:
            text += SEPARATOR
        spans.append((len(text), len(text) + len(part)))
        text += part
    return text, tuple(spans)
