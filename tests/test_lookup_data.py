"""The lookup generator (:mod:`tokattr.data.lookup`): definitions among filler passages, read
back against a brute-force reading of the prompt string."""

from __future__ import annotations

import re

import pytest

from tokattr.data.lookup import FILLER_CHARS, KEYS, LookupGenerator

DEFINITION = re.compile(r"^[A-Za-z][0-9]$")


def _check(p, filler: tuple[int, int]) -> None:
    """Everything a problem claims, read again from its prompt string alone."""
    context, _, key = p.prompt.rpartition(";")
    assert key in KEYS and len(key) == 1
    parts = context.split(";")
    assert [p.prompt[s:e] for s, e in p.segments] == parts  # spans in order, all of them
    defs = [i for i, t in enumerate(parts) if DEFINITION.match(t)]
    assert list(p.definitions) == defs
    for i, t in enumerate(parts):
        if i not in defs:
            assert set(t) <= set(FILLER_CHARS) and 1 <= len(t) <= filler[1]
    keys = [parts[i][0] for i in defs]
    assert len(set(keys)) == len(keys)  # distinct keys
    assert context.count(key) == 1  # the query key occurs once: in its definition
    (src,) = p.sources
    assert src in defs and parts[src] == key + p.answer


def test_without_filler_the_prompt_is_the_definitions_alone():
    gen = LookupGenerator(3, (5, 9), length=None)
    p = gen.problem(0)
    assert p.prompt == "b1;a3;v3;l3;q1;I3;I"  # the format before filler existed, unchanged
    assert p.answer == "3" and p.sources == (5,) and p.definitions == tuple(range(6))
    for i in range(50):
        p = gen.problem(i)
        defs, _ = gen.definitions(i)
        assert p.prompt.rpartition(";")[0] == ";".join(k + v for k, v in defs)
        _check(p, (1, 1))


@pytest.mark.parametrize(
    ("pairs", "length", "filler"),
    [((20, 52), (100, 400), (8, 48)), ((5, 7), (100, 160), (40, 64)), ((1, 3), (30, 31), (1, 2))],
)
def test_filler_makes_the_prompt_as_long_as_drawn(pairs, length, filler):
    gen = LookupGenerator(11, pairs, length, filler)
    lengths = []
    for i in range(200):
        p = gen.problem(i)
        _check(p, filler)
        assert pairs[0] <= len(p.definitions) <= pairs[1]
        shortest = 3 * len(p.definitions) + 1  # the definitions and the query alone
        if len(p.segments) > len(p.definitions):  # filler up to the length drawn
            assert length[0] <= len(p.prompt) <= length[1]
        else:  # no room for a passage (";" and a digit): the definitions alone
            assert len(p.prompt) == shortest >= length[0] - 1
        lengths.append(len(p.prompt))
    if length[1] - length[0] > 50:  # drawn uniformly: both ends are reached
        span = length[1] - length[0]
        assert min(lengths) < length[0] + span / 5 and max(lengths) > length[1] - span / 5


def test_the_source_is_anywhere_among_the_parts():
    """Sources fall at every depth of the context (not always last or first), and filler sits
    before, between and after definitions."""
    gen = LookupGenerator(5)
    depth = [p.sources[0] / (len(p.segments) - 1) for p in gen.take(300)]
    assert min(depth) < 0.1 and max(depth) > 0.9
    first_is_filler = [p.definitions[0] > 0 for p in gen.take(100)]
    last_is_filler = [p.definitions[-1] < len(p.segments) - 1 for p in gen.take(100)]
    assert any(first_is_filler) and any(last_is_filler)


def test_the_same_seed_gives_the_same_problems():
    a, b = LookupGenerator(2, length=(50, 90)), LookupGenerator(2, length=(50, 90))
    assert a.take(20) == b.take(20)
    assert a.take(5) != LookupGenerator(3, length=(50, 90)).take(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pairs": (0, 3)}, "pairs must be"),
        ({"pairs": (3, 53)}, "pairs must be"),
        ({"length": (400, 100)}, "length must be"),
        ({"length": (0, 10)}, "length must be"),
        ({"filler": (0, 4)}, "filler must be"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LookupGenerator(0, **kwargs)
