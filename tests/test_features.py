"""Features other than tokens: spans of words, sentences, lines and separated parts, explicit
spans, and the feature each token of a real tokenizer belongs to."""

from __future__ import annotations

import random

import pytest
from _tiny import bpe_tokenizer

from tokattr.features import check_spans, feature_spans, token_features
from tokattr.models import load_tokenizer


def _texts(text, spans):
    return [text[s:e] for s, e in spans]


def test_each_granularity_gives_the_spans_it_names():
    text = "The cat sat. It was 3.5 m tall!  Why?\nNext line here\n\nLast part"
    assert feature_spans(text, "token") is None
    assert _texts(text, feature_spans(text, "word"))[:5] == ["The", "cat", "sat.", "It", "was"]
    assert _texts(text, feature_spans(text, "sentence")) == [
        "The cat sat.", "It was 3.5 m tall!", "Why?", "Next line here", "Last part",
    ]  # fmt: skip
    assert _texts(text, feature_spans(text, "line")) == [
        "The cat sat. It was 3.5 m tall!  Why?", "Next line here", "Last part",
    ]  # fmt: skip
    demos = "12+3=15; 9-4=5 ;7*2=14"
    spans = feature_spans(demos, "separator:;")
    assert _texts(demos, spans) == ["12+3=15", "9-4=5", "7*2=14"]
    assert all(";" not in demos[s:e] for s, e in spans)  # the separator is context


def test_explicit_spans_are_checked_and_kept():
    text = "context: A. question: B?"
    assert feature_spans(text, [(9, 11), (22, 24)]) == [(9, 11), (22, 24)]
    for spans, message in [
        ([(0, 30)], r"0 <= start < end <= 24"),
        ([(5, 5)], r"0 <= start < end"),
        ([(4, 9), (8, 12)], "overlaps or precedes span 0"),
        ([(9, 11), (0, 3)], "overlaps or precedes"),
        ([(1.0, 3)], "must hold integers"),
        ([(1, 2, 3)], r"must be a \(start, end\) pair"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_spans(text, spans)


@pytest.mark.parametrize(
    ("features", "message"),
    [("words", "unknown features 'words'"), ("separator:", "non-empty separator")],
)
def test_bad_granularities_are_refused(features, message):
    with pytest.raises(ValueError, match=message):
        feature_spans("a b", features)


def test_a_prompt_without_features_is_refused():
    with pytest.raises(ValueError, match="no feature"):
        feature_spans(" \n ", "word")
    with pytest.raises(ValueError, match="no feature"):
        feature_spans(";;", "separator:;")


def _offsets(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tuple(o) for o in enc["offset_mapping"]]


@pytest.mark.parametrize("which", ["bpe", "arith"])
def test_every_token_of_a_word_belongs_to_that_word(which):
    """Byte-level BPE tokens carry the space before their word (outside the word's span); the
    bundled tokenizer's carry a metaspace. Each still belongs to its word."""
    tok = bpe_tokenizer() if which == "bpe" else load_tokenizer("arith-tiny")[0]
    text = "the cat sat on the mat; 12+3=15 and 9-4=5" if which == "bpe" else "12+3=15; 9-4=5"
    offsets = _offsets(tok, text)
    spans = feature_spans(text, "word")
    owners = token_features(text, offsets, spans)
    for (start, end), f in zip(offsets, owners, strict=True):
        piece = text[start:end]
        if piece.strip():
            s, e = spans[f]
            first = start + len(piece) - len(piece.lstrip())
            assert s <= first < e, (piece, text[s:e])
    assert set(owners) - {-1} == set(range(len(spans)))  # every word has a token


def test_token_features_equal_a_brute_force_reading_of_the_rule():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab ;.\n") for _ in range(rng.randint(1, 30)))
        if not text.strip(" ;\n"):
            continue
        # Random tokens: a partition of the text into pieces of 1-4 characters.
        offsets, i = [], 0
        while i < len(text):
            j = min(len(text), i + rng.randint(1, 4))
            offsets.append((i, j))
            i = j
        for features in ("word", "sentence", "line", "separator:;"):
            try:
                spans = feature_spans(text, features)
            except ValueError:
                continue
            got = token_features(text, offsets, spans)
            for (s, e), f in zip(offsets, got, strict=True):
                chars = [c for c in range(s, e) if not text[c].isspace()] or [s]
                inside = [k for k, (a, b) in enumerate(spans) if a <= chars[0] < b]
                assert f == (inside[0] if inside else -1), (text, features, (s, e))
