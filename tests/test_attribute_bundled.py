"""The attribution engine on the bundled model ``arith-tiny``: the numbers are right."""

from __future__ import annotations

import pytest
import torch
from _tiny import baseline_embeds, direct_log_prob, unpadded

import tokattr

PROMPTS = ["$16,000/-0.8=", "9 + 3 = 12;7 x 5 = 35;$16,000/-0.8=", "86+-31=", "74x48="]
ANSWERS = ["-20000", "-20000", "55", "3552"]


@pytest.fixture(scope="module")
def lm():
    return tokattr.load_model("arith-tiny")


def test_default_target_equals_log_probs_from_full_sequence_logits(lm):
    results = tokattr.attribute(lm, PROMPTS, method="saliency", target=ANSWERS)
    for res, prompt, answer in zip(results, PROMPTS, ANSWERS, strict=True):
        ids, n_prompt, _ = unpadded(lm, prompt, answer)
        with torch.no_grad():
            embeds = lm.model.get_input_embeddings()(ids)[None]
            want = direct_log_prob(lm, embeds, ids, n_prompt).item()
        assert res.target_score == pytest.approx(want, abs=1e-5)
        assert res.target_score > -1.0  # the model gets these right: high log-probability


def test_occlusion_equals_brute_force(lm):
    prompt, answer = PROMPTS[0], ANSWERS[0]
    res = tokattr.attribute(lm, prompt, method="occlusion", target=answer)
    ids, n_prompt, cols = unpadded(lm, prompt, answer)
    with torch.no_grad():
        x, _ = baseline_embeds(lm, ids, cols)
        pad = lm.model.get_input_embeddings().weight[lm.tokenizer.pad_token_id]
        rows = x.repeat(len(cols), 1, 1)
        rows[torch.arange(len(cols)), cols] = pad  # one token removed per row
        f_x = direct_log_prob(lm, x, ids, n_prompt)
        want = f_x - direct_log_prob(lm, rows, ids, n_prompt)
    torch.testing.assert_close(res.scores, want.float(), rtol=1e-4, atol=1e-5)
    assert res.tokens == ["▁$", "1", "6", ",", "0", "0", "0", "/", "-", "0", ".", "8", "="]


@pytest.mark.slow
def test_integrated_gradients_converges_to_completeness(lm):
    """Sum of scores -> f(x) - f(baseline). On this trained model the path integrand is sharply
    peaked: 64 Gauss–Legendre nodes leave errors of 0.3-21% on these prompts (median 19% over
    40 generator prompts), 512 bring them under 1%. The 64-step bar is open work."""
    results = tokattr.attribute(
        lm, PROMPTS, method="integrated_gradients", target=ANSWERS, n_steps=512, batch_size=512
    )
    for res, prompt, answer in zip(results, PROMPTS, ANSWERS, strict=True):
        ids, n_prompt, cols = unpadded(lm, prompt, answer)
        with torch.no_grad():
            x, b = baseline_embeds(lm, ids, cols)
            f_x, f_b = direct_log_prob(lm, x, ids, n_prompt), direct_log_prob(lm, b, ids, n_prompt)
        gap = (f_x - f_b).item()
        assert res.scores.sum().item() == pytest.approx(gap, rel=1e-2), prompt
        assert res.delta == pytest.approx(res.scores.sum().item() - gap, abs=1e-3 * abs(gap))


def test_integration_rule_is_a_parameter(lm):
    kw = dict(method="integrated_gradients", target=ANSWERS[2], n_steps=8)
    gl = tokattr.attribute(lm, PROMPTS[2], **kw)
    trap = tokattr.attribute(lm, PROMPTS[2], rule="riemann_trapezoid", **kw)
    assert gl.params["rule"] == "gausslegendre" and trap.params["rule"] == "riemann_trapezoid"
    assert not torch.allclose(gl.scores, trap.scores)
    with pytest.raises(ValueError, match="unknown rule 'simpson'"):
        tokattr.attribute(lm, PROMPTS[2], rule="simpson", **kw)


@pytest.mark.parametrize(
    "method", ["integrated_gradients", "occlusion", "kernel_shap", "input_x_gradient"]
)
def test_a_prompt_scores_the_same_alone_and_in_a_padded_batch(lm, method):
    params = {"n_samples": 64} if method == "kernel_shap" else {}
    alone = tokattr.attribute(lm, PROMPTS[0], method=method, target=ANSWERS[0], seed=3, **params)
    batch = tokattr.attribute(
        lm, PROMPTS, method=method, target=ANSWERS, seed=[3, 4, 5, 6], **params
    )
    torch.testing.assert_close(batch[0].scores, alone.scores, rtol=1e-5, atol=1e-5)
