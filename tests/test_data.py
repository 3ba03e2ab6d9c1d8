"""The arithmetic generator, its labels, JSONL input, and the tokenizer."""

from __future__ import annotations

import json
import re
from decimal import Decimal, localcontext

import pytest
from transformers import AutoTokenizer

from tokattr.data import (
    BUCKETS,
    FORMATTED_BUCKETS,
    ArithmeticGenerator,
    format_number,
    label_prompt,
    make_problem,
    read_jsonl,
    solve,
    token_roles,
    with_demonstrations,
)
from tokattr.data.arithmetic import (
    DECIMAL_POINT,
    DEMONSTRATION,
    EQUALS,
    FORMATTING,
    OPERAND,
    OPERATOR,
    SIGN,
)

SEED_PROMPT = "$16,000/-0.8="
SEED_TOKENS = ["▁$", "1", "6", ",", "0", "0", "0", "/", "-", "0", ".", "8", "="]


def reference_answer(prompt: str) -> str:
    """An independent solver: Decimal arithmetic on the text, canonicalised by hand."""
    query = prompt.rsplit(";", 1)[-1]
    m = re.fullmatch(r"\s*(-?)\$?([\d,.]+)\s*([-+x/])\s*(-?)\$?([\d,.]+)\s*=\s*", query)
    assert m, query
    a = Decimal(m[1] + m[2].replace(",", ""))
    b = Decimal(m[4] + m[5].replace(",", ""))
    with localcontext() as ctx:
        ctx.prec = 50
        value = {"+": a + b, "-": a - b, "x": a * b, "/": a / b if b else None}[m[3]]
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


CANONICAL = re.compile(r"-?(0|[1-9]\d*)(\.\d*[1-9])?")


@pytest.mark.parametrize("bucket", sorted(BUCKETS))
def test_answers_are_correct_and_canonical(bucket):
    for p in ArithmeticGenerator(seed=7, mix=bucket).take(400):
        assert p.answer == reference_answer(p.prompt), p
        assert CANONICAL.fullmatch(p.answer), p
        assert p.bucket == bucket
        assert p.prompt.endswith(("=", "= "))


def test_bucket_shapes():
    g = lambda b: ArithmeticGenerator(seed=3, mix=b).take(300)  # noqa: E731
    for p in g("add") + g("sub"):
        a, b = re.split(r"[-+]", p.prompt[:-1])
        assert 0 <= int(a) <= 999 and 0 <= int(b) <= 999
    for p in g("mul_2x2"):
        a, b = p.prompt[:-1].split("x")
        assert len(a) == len(b) == 2
    for p in g("mul_1x2"):
        lens = sorted(len(x) for x in p.prompt[:-1].split("x"))
        assert lens[0] == 1 and lens[1] in (1, 2)
    for p in g("div"):
        assert "." not in p.answer and 1 <= len(p.answer.lstrip("-")) <= 2
    for p in g("seed_like"):
        assert re.fullmatch(r"\$[\d,]+/-0\.[1-9]=", p.prompt), p.prompt
        # -q followed by 2 or 3 zeros; q may be 0 (then the dividend is $0 too)
        assert (p.answer.startswith("-") and p.answer.endswith("00")) or p.prompt.startswith("$0/")
    assert all("$" in p.prompt and "," in p.prompt for p in g("currency"))
    assert all(
        " + " in p.prompt or " - " in p.prompt or " x " in p.prompt or " / " in p.prompt
        for p in g("spaces")
    )
    # each operand of + and - is one-decimal with probability 0.8; x always has one
    decimal = g("decimal")
    with_point = [p for p in decimal if "." in p.prompt]
    assert len(with_point) >= 0.9 * len(decimal)
    assert all("x" not in p.prompt for p in decimal if p not in with_point)
    assert all(
        re.fullmatch(r"\d+(\.\d)?", x) for p in decimal for x in re.split("[-+x]", p.prompt[:-1])
    )
    assert all(re.search(r"(^|[-+x/])-\d", p.prompt) for p in g("negative"))


def test_the_seed_prompt():
    assert solve(SEED_PROMPT) == "-20000"
    assert label_prompt(SEED_PROMPT) == (
        FORMATTING, OPERAND, OPERAND, FORMATTING, OPERAND, OPERAND, OPERAND,
        OPERATOR, SIGN, OPERAND, DECIMAL_POINT, OPERAND, EQUALS,
    )  # fmt: skip


def test_format_number():
    from fractions import Fraction

    assert format_number(Fraction(-20000)) == "-20000"
    assert format_number(Fraction(15, 2)) == "7.5"
    assert format_number(Fraction(1, 40)) == "0.025"
    assert format_number(Fraction(0)) == "0"
    assert format_number(Fraction(-3, 10)) == "-0.3"
    with pytest.raises(ValueError, match="finite decimal"):
        format_number(Fraction(1, 3))


def test_generator_is_a_pure_function_of_seed_and_index():
    a = ArithmeticGenerator(seed=11, demonstrations=(0, 3)).take(50)
    b = ArithmeticGenerator(seed=11, demonstrations=(0, 3)).take(50)
    c = ArithmeticGenerator(seed=12, demonstrations=(0, 3)).take(50)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert ArithmeticGenerator(seed=11, demonstrations=(0, 3)).problem(17) == a[17]
    assert len({p.id for p in a}) == 50


def test_demonstrations_and_their_labels():
    probs = ArithmeticGenerator(seed=5, demonstrations=(1, 4)).take(100)
    for p in probs:
        demos, query = p.prompt.rsplit(";", 1)
        n = len(demos) + 1
        assert set(p.roles[:n]) == {DEMONSTRATION}
        assert DEMONSTRATION not in p.roles[n:]
        for d in demos.split(";"):  # every demonstration is solved correctly
            q, ans = d.split("=")
            assert reference_answer(q + "=") == ans.strip()
        assert p.answer == reference_answer(query)
    assert with_demonstrations(["9 + 3 = 12", "7 x 5 = 35"], SEED_PROMPT) == (
        "9 + 3 = 12;7 x 5 = 35;" + SEED_PROMPT
    )
    with pytest.raises(ValueError, match="may not contain"):
        with_demonstrations(["1+1=2;"], "3+4=")


def test_roles_for_spaces_and_signs():
    roles = label_prompt("86 + -31 = ")
    assert roles == (
        OPERAND, OPERAND, FORMATTING, OPERATOR, FORMATTING, SIGN, OPERAND, OPERAND,
        FORMATTING, EQUALS, FORMATTING,
    )  # fmt: skip
    assert label_prompt("9-13=")[1] == OPERATOR
    assert label_prompt("9--3=")[1:3] == (OPERATOR, SIGN)


def test_bad_prompts_are_named():
    with pytest.raises(ValueError, match="not an arithmetic query"):
        label_prompt("hello=")
    with pytest.raises(ValueError, match="empty prompt"):
        make_problem("x", "")
    with pytest.raises(ValueError, match="unknown buckets"):
        ArithmeticGenerator(mix={"pow": 1.0})
    with pytest.raises(ValueError, match="demonstrations"):
        ArithmeticGenerator(demonstrations=(3, 1))


def test_labels_align_with_tokens(arith_tokenizer):
    tok = arith_tokenizer
    enc = tok(SEED_PROMPT, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == SEED_TOKENS
    roles = token_roles(enc["offset_mapping"], SEED_PROMPT, label_prompt(SEED_PROMPT))
    assert roles == list(label_prompt(SEED_PROMPT))  # one char per token here

    prompt = "9 + 3 = 12;86 + -31 = "
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    roles = token_roles(enc["offset_mapping"], prompt, label_prompt(prompt))
    got = list(zip(toks, roles, strict=True))
    assert got[-8:] == [
        ("8", OPERAND), ("6", OPERAND), ("▁+", OPERATOR), ("▁-", SIGN), ("3", OPERAND),
        ("1", OPERAND), ("▁=", EQUALS), ("▁", FORMATTING),
    ]  # fmt: skip
    assert all(r == DEMONSTRATION for _, r in got[: len(got) - 8])


def test_plausibility_labels_mark_what_the_answer_depends_on(arith_tokenizer):
    """1: operand digits, sign, decimal point, operator; 0: formatting and demonstrations;
    -1: ``=``."""
    from tokattr.data.labels import relevance

    tok = arith_tokenizer
    prompt = "9 + 3 = 12;-$1,000.5 x 3="
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    got = list(zip(toks, relevance(prompt, enc["offset_mapping"]), strict=True))
    assert got == [
        ("▁", 0), ("9", 0), ("▁+", 0), ("▁", 0), ("3", 0), ("▁=", 0), ("▁", 0), ("1", 0),
        ("2", 0), (";", 0),  # the demonstration and its separator
        ("-", 1), ("$", 0), ("1", 1), (",", 0), ("0", 1), ("0", 1), ("0", 1), (".", 1),
        ("5", 1), ("▁x", 1), ("▁", 0), ("3", 1), ("=", -1),
    ]  # fmt: skip
    assert relevance("not arithmetic", [(0, 3)]) is None


@pytest.mark.parametrize("bucket", sorted(BUCKETS))
def test_every_token_gets_the_role_of_its_characters(arith_tokenizer, bucket):
    tok = arith_tokenizer
    for p in ArithmeticGenerator(seed=2, mix=bucket, demonstrations=(0, 2)).take(50):
        enc = tok(p.prompt, return_offsets_mapping=True, add_special_tokens=False)
        roles = token_roles(enc["offset_mapping"], p.prompt, p.roles)
        for (s, e), role in zip(enc["offset_mapping"], roles, strict=True):
            chars = {p.roles[i] for i in range(s, e) if not p.prompt[i].isspace()}
            assert role in chars or (not chars and role in (FORMATTING, DEMONSTRATION))


def test_tokenizer_round_trip(tmp_path, arith_tokenizer):
    tok = arith_tokenizer
    assert tok.convert_ids_to_tokens(tok(SEED_PROMPT).input_ids) == ["<s>", *SEED_TOKENS]
    for p in ArithmeticGenerator(seed=1, demonstrations=(0, 3)).take(200):
        text = p.prompt + p.answer
        ids = tok(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids
        # every digit is its own token
        assert all(
            len(t) == 1 for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)
        )
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(SEED_PROMPT).input_ids == tok(SEED_PROMPT).input_ids
    assert loaded.padding_side == "left"


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "prompt": SEED_PROMPT, "answer": "-20000"},
        {"id": "b", "prompt": "9 + 3 = "},
        {"id": "c", "prompt": "The capital of France is", "answer": " Paris"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    probs = read_jsonl(path)
    assert [p.id for p in probs] == ["a", "b", "c"]
    assert probs[1].answer == "12"
    assert probs[0].roles == label_prompt(SEED_PROMPT)
    assert probs[2].roles is None  # not arithmetic: no labels, still usable

    with pytest.raises(FileNotFoundError, match="no such JSONL"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "1+1="}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "1+1="}\n{"id": "a", "prompt": "1+2="}\n')
    with pytest.raises(ValueError, match="duplicate id"):
        read_jsonl(dup)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no problems"):
        read_jsonl(empty)
    # No answer and not arithmetic: kept unset, so the model's greedy answer is attributed
    # (as configs/bench/jsonl.yaml says), not parsed as a broken arithmetic query.
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"id": "a", "prompt": "Hello"}\n')
    (only,) = read_jsonl(noans)
    assert only.answer is None and only.roles is None and only.line == 1
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"id": "a", "prompt": "1+1=", "answer": 2}\n')
    with pytest.raises(ValueError, match=r'typed\.jsonl:1: "answer" must be a string, got int'):
        read_jsonl(typed)


def test_formatted_buckets_are_buckets():
    assert set(FORMATTED_BUCKETS) <= set(BUCKETS)
