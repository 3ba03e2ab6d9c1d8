"""Chat prompts: the template's tokens are never features nor removed, and a chat prompt
scores exactly as its rendered text with the contents' spans."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_bpe_lm

from tokattr.attribution import attribute
from tokattr.chat import render_chat

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "The capital of France is Paris. What is it?"},
]


def _content_ranges(text: str) -> list[tuple[int, int]]:
    out, at = [], 0
    for m in CHAT:
        start = text.index(m["content"], at)
        at = start + len(m["content"])
        if m["role"] == "user":
            out.append((start, at))
    return out


@pytest.mark.parametrize("features", ["token", "word", "sentence", "message"])
def test_no_template_token_is_a_feature_and_scores_equal_explicit_spans(features):
    lm = tiny_bpe_lm("qwen2")
    chat = attribute(lm, CHAT, "occlusion", target=" Paris", features=features)
    text, spans = render_chat(lm.tokenizer, CHAT, features)
    assert chat.prompt == text
    assert text == lm.tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                    add_generation_prompt=True)  # fmt: skip
    assert chat.granularity == f"chat:{features}"
    users = _content_ranges(text)
    assert chat.spans == list(spans) and all(
        any(lo <= a < b <= hi for lo, hi in users) for a, b in chat.spans
    )
    # Every token of a feature starts inside a user content; every template token is context.
    outside = 0
    for (a, b), f in zip(chat.offsets, chat.token_features, strict=True):
        first = next((c for c in range(a, b) if not text[c].isspace()), a)
        inside = any(lo <= first < hi for lo, hi in users)
        assert inside or f == -1, (text[a:b], f)
        outside += not inside
    assert outside > 5  # the system message and the template's markers
    if features == "message":
        assert chat.features == [CHAT[1]["content"]]
    if features == "sentence":
        assert chat.features == ["The capital of France is Paris.", "What is it?"]
    plain = attribute(lm, text, "occlusion", target=" Paris", features=list(spans))
    assert torch.equal(chat.scores, plain.scores)
    assert chat.answer_ids == plain.answer_ids


def test_feature_roles_choose_the_messages():
    lm = tiny_bpe_lm("qwen2")
    both = attribute(lm, CHAT, "occlusion", target=" Paris", features="message",
                     feature_roles=("system", "user"))  # fmt: skip
    assert both.features == [m["content"] for m in CHAT]


def test_chat_prompts_in_a_list_with_text_prompts():
    lm = tiny_bpe_lm("qwen2")
    out = attribute(lm, [CHAT, "The capital of France is"], "occlusion",
                    target=[" Paris", " Paris"], features="word")  # fmt: skip
    assert out[0].granularity == "chat:word" and out[1].granularity == "word"


@pytest.mark.parametrize(
    ("arch", "messages", "message"),
    [
        ("gpt2", CHAT, "needs a tokenizer with a chat template"),
        ("qwen2", [{"role": "system", "content": "Hi"}], "no message of the roles \\['user'\\]"),
        ("qwen2", [{"role": "user"}], "must have a string 'role' and a string 'content'"),
        ("qwen2", [{"role": "user", "content": "  "}], "no message of the roles"),
    ],
)
def test_bad_chat_prompts_are_refused_before_any_model_call(arch, messages, message, monkeypatch):
    lm = tiny_bpe_lm(arch)

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(lm.model, "forward", no_forward)
    with pytest.raises(ValueError, match=message):
        attribute(lm, messages, "occlusion", target=" Paris")
