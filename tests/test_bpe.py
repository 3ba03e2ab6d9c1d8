"""Byte-level BPE models (GPT-2, Qwen2 with a chat template, Mistral with BOS): the answer
attributed is the tokens the model generated, contrast scores are exact, and every method
and target function keeps its contract where a decode/re-encode would not give the same
tokens back."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import BPE_ARCHS, tiny_bpe_lm

from tokattr.attribution import attribute
from tokattr.methods import METHODS

FAST = {
    "integrated_gradients": {"n_steps": 8},
    "kernel_shap": {"n_samples": 40},
    "shapley_sampling": {"n_samples": 2},
}
PROMPTS = ["The capital of France is", " Café 東京 and", "Answer: 42. The quick"]
ANSWERS = [" Paris", " 日本", " brown fox"]
FOILS = [" Rome, the capital of Italy", " x", " lazy"]  # longer, shorter, shorter


def _prompts(arch: str) -> list[str]:
    """The plain prompts, and for Qwen2 one through its chat template (special tokens in the
    middle of the prompt)."""
    if arch != "qwen2":
        return list(PROMPTS)
    tok = tiny_bpe_lm(arch).tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "France is"}], tokenize=False, add_generation_prompt=True
    )
    return [chat, *PROMPTS[1:]]


def _generate(lm, prompt: str, n: int = 12) -> list[int]:
    """transformers' own greedy continuation, cut at the first EOS: the reference."""
    enc = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False,
                            eos_token_id=lm.tokenizer.eos_token_id,
                            pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    eos = lm.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def _log_p(lm, prompt: str, continuation_ids: list[int]) -> float:
    """log p(continuation | prompt) from one unpadded forward pass over the token ids."""
    prompt_ids = lm.tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + continuation_ids])
    with torch.no_grad():
        logp = lm.model(input_ids=ids).logits.double().log_softmax(-1)[0]
    n = len(prompt_ids)
    return float(sum(logp[n + i - 1, t] for i, t in enumerate(continuation_ids)))


def _in_context(lm, prompt: str, text: str) -> list[int]:
    full = lm.tokenizer(prompt + text)["input_ids"]
    return full[len(lm.tokenizer(prompt)["input_ids"]) :]


@pytest.mark.parametrize("arch", BPE_ARCHS)
def test_the_default_answer_is_the_generated_token_ids(arch):
    lm = tiny_bpe_lm(arch)
    prompts = _prompts(arch)
    generated = [_generate(lm, p) for p in prompts]
    res = attribute(lm, prompts, "saliency")
    rows = attribute(lm, prompts, "saliency", per_answer_token=True)
    for r, per_token, ids in zip(res, rows, generated, strict=True):
        assert r.answer_ids == ids and len(r.answer_tokens) == len(ids) > 0
        assert r.answer_tokens == lm.tokenizer.convert_ids_to_tokens(ids)
        assert per_token.scores.shape == (len(ids), len(r.tokens))
        assert r.target_score == pytest.approx(_log_p(lm, r.prompt, ids), abs=1e-4)
    # What the old decode-strip-re-encode path would have attributed differs for some prompt:
    # the test above is not one a round trip would pass anyway.
    round_trip = [
        _in_context(lm, p, lm.tokenizer.decode(ids).strip())
        for p, ids in zip(prompts, generated, strict=True)
    ]
    assert round_trip != generated


@pytest.mark.parametrize("arch", BPE_ARCHS)
def test_contrast_is_the_log_prob_difference_for_longer_and_shorter_foils(arch):
    lm = tiny_bpe_lm(arch)
    prompts = _prompts(arch)
    res = attribute(lm, prompts, "occlusion", target=ANSWERS, foil=FOILS, target_fn="contrast")
    for r, prompt, answer, foil in zip(res, prompts, ANSWERS, FOILS, strict=True):
        want = _log_p(lm, prompt, _in_context(lm, prompt, answer)) - _log_p(
            lm, prompt, _in_context(lm, prompt, foil)
        )
        assert abs(r.target_score - want) <= 1e-5, (prompt, foil, r.target_score, want)
    lengths = [(len(_in_context(lm, p, a)), len(_in_context(lm, p, f)))
               for p, a, f in zip(prompts, ANSWERS, FOILS, strict=True)]  # fmt: skip
    assert any(f > a for a, f in lengths) and any(f < a for a, f in lengths)


@pytest.mark.parametrize("target_fn", ["log_prob", "prob", "logit", "contrast"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", BPE_ARCHS)
def test_every_method_and_target_on_bpe(arch, method, target_fn):
    lm = tiny_bpe_lm(arch)
    tok = lm.tokenizer
    # The chat-templated prompt has more tokens than exact Shapley enumerates in a test.
    prompts = _prompts(arch) if method != "exact_shapley" else list(PROMPTS)
    kw = dict(FAST.get(method, {}), target_fn=target_fn, batch_size=16)
    if target_fn == "contrast":
        kw["foil"] = FOILS
    batch = attribute(lm, prompts, method, target=ANSWERS, seed=[1, 2, 3], **kw)
    if target_fn == "contrast":
        kw["foil"] = FOILS[1]
    alone = attribute(lm, prompts[1], method, target=ANSWERS[1], seed=2, **kw)
    for r, prompt, answer in zip(batch, prompts, ANSWERS, strict=True):
        ids = tok(prompt)["input_ids"]
        special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
        assert r.token_ids == [i for i in ids if i not in special]  # no BOS, no <|im_start|>
        assert r.tokens == tok.convert_ids_to_tokens(r.token_ids)
        assert r.answer_ids == _in_context(lm, prompt, answer) and r.target == answer
        assert r.scores.shape == (len(r.tokens),) and torch.isfinite(r.scores).all()
        assert math.isfinite(r.target_score)
        # Offsets map features back into the prompt text (the chat template's too).
        for (a, b), t in zip(r.offsets, r.token_ids, strict=True):
            assert tok.decode([t]).strip() == "" or prompt[a:b] != ""
    torch.testing.assert_close(batch[1].scores, alone.scores, atol=1e-5, rtol=1e-4)
    assert batch[1].target_score == pytest.approx(alone.target_score, abs=1e-5)
