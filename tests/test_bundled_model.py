"""The bundled model ``arith-tiny`` meets its accuracy bars on fresh problems."""

from __future__ import annotations

import pytest

import tokattr
from tokattr.accuracy import BARS, SEED_ANSWER, SEED_PROMPT, bucket_accuracy, greedy_answers
from tokattr.data import ArithmeticGenerator
from tokattr.data.arithmetic import SEPARATOR
from tokattr.lightning.train import Chain, collate, encode_chain, exact_match

# The bundled model misses one bar, said in its model card: subtraction reaches 95.4%
# against 98%. The test holds it to what the card claims, and every other bar to the bar.
DOCUMENTED_SHORTFALL = {"sub": 0.95}


@pytest.fixture(scope="module")
def lm():
    return tokattr.load_model("arith-tiny")


def test_seed_prompt_is_answered(lm):
    assert greedy_answers(lm, [SEED_PROMPT]) == [SEED_ANSWER]


@pytest.mark.slow
def test_accuracy_bars(lm):
    # The model card's sample: 500 fresh problems per bucket, seed 2026 (training used seeds
    # 0 and 1, validation 1000003).
    rows = {r.bucket: r for r in bucket_accuracy(lm, n_per_bucket=500, seed=2026)}
    report = {b: round(r.accuracy, 3) for b, r in rows.items()}
    for bucket, bar in BARS.items():
        assert rows[bucket].accuracy >= DOCUMENTED_SHORTFALL.get(bucket, bar), (bucket, report)
    assert rows["seed_prompt"].correct == 1
    card = (lm.path / "README.md").read_text()
    for bucket in DOCUMENTED_SHORTFALL:
        assert f"`{bucket}`: {rows[bucket].accuracy:.1%}, bar" in card  # the card says so


def test_batched_greedy_equals_one_at_a_time(lm):
    prompts = [p.prompt for p in ArithmeticGenerator(seed=99, demonstrations=(0, 3)).take(24)]
    batched = greedy_answers(lm, prompts, batch_size=24)
    alone = [greedy_answers(lm, [p])[0] for p in prompts]
    assert batched == alone


def test_teacher_forced_exact_match_equals_greedy(lm):
    """The training monitor (one forward pass) agrees with real greedy decoding, row by row."""
    tok = lm.tokenizer
    problems = ArithmeticGenerator(seed=77, demonstrations=(0, 2)).take(120)
    rows = [
        encode_chain(Chain(p.prompt + p.answer, ((len(p.prompt), len(p.prompt + p.answer)),)), tok)
        for p in problems
    ]
    batch = collate(rows, tok.pad_token_id)  # right padding, positions from 0
    stops = (tok.eos_token_id, tok.convert_tokens_to_ids(SEPARATOR))
    forced = exact_match(lm.model, batch, stops).tolist()
    greedy = [
        g == p.answer
        for g, p in zip(greedy_answers(lm, [p.prompt for p in problems]), problems, strict=True)
    ]
    assert forced == greedy
