"""The attribution engine on the bundled model ``arith-tiny``: the numbers are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import baseline_embeds, direct_log_prob, unpadded

import tokattr
from tokattr.data.arithmetic import ArithmeticGenerator

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


def _completeness_errors(lm, results, prompts, answers) -> list[float]:
    """|sum(scores) - (f(x) - f(baseline))| / |f(x) - f(baseline)|, the ends computed here."""
    errors = []
    for res, prompt, answer in zip(results, prompts, answers, strict=True):
        ids, n_prompt, cols = unpadded(lm, prompt, answer)
        with torch.no_grad():
            x, b = baseline_embeds(lm, ids, cols)
            f_x, f_b = direct_log_prob(lm, x, ids, n_prompt), direct_log_prob(lm, b, ids, n_prompt)
        gap = (f_x - f_b).item()
        assert res.delta == pytest.approx(res.scores.sum().item() - gap, abs=1e-3 * abs(gap))
        errors.append(abs(res.scores.sum().item() - gap) / abs(gap))
    return errors


def test_integrated_gradients_completeness_at_64_steps(lm):
    """On this trained model the target jumps by ten nats or more within 2% of the path from
    the all-pad baseline, so 64 Gauss–Legendre nodes leave a completeness error of 28% of the
    gap on average over these 24 prompts (up to 213%). ``rule="adaptive_simpson"`` spends the
    same 64 gradient evaluations where each path is steep: 0.9% on average when written (max
    4.4%), and per-token scores within 1.2% of the 1,024-node values on average."""
    problems = ArithmeticGenerator(seed=4242).take(20)
    prompts = PROMPTS + [p.prompt for p in problems]
    answers = ANSWERS + [p.answer for p in problems]
    errors = {}
    for rule in ("gausslegendre", "adaptive_simpson"):
        results = tokattr.attribute(
            lm, prompts, method="integrated_gradients", target=answers, n_steps=64, rule=rule
        )
        errors[rule] = _completeness_errors(lm, results, prompts, answers)
    adaptive, gl = (np.mean(errors[r]) for r in ("adaptive_simpson", "gausslegendre"))
    assert adaptive <= 1e-2, errors["adaptive_simpson"]
    assert np.median(errors["adaptive_simpson"]) <= 5e-3
    assert max(errors["adaptive_simpson"]) <= 5e-2
    assert gl > 10 * adaptive  # why the rule exists: GL-64 does not resolve these paths


@pytest.mark.slow
def test_integrated_gradients_converges_to_completeness(lm):
    """Both rules converge: 512 Gauss–Legendre nodes bring every prompt's completeness error
    under 1% (0.02% median over 40 generator prompts), and the adaptive rule's 64-step scores
    are within 3% (L1, relative) of the 1,024-node scores on every prompt here."""
    ref = tokattr.attribute(
        lm, PROMPTS, method="integrated_gradients", target=ANSWERS, n_steps=1024, batch_size=512
    )
    results = tokattr.attribute(
        lm, PROMPTS, method="integrated_gradients", target=ANSWERS, n_steps=512, batch_size=512
    )
    assert max(_completeness_errors(lm, results, PROMPTS, ANSWERS)) <= 1e-2
    adaptive = tokattr.attribute(
        lm, PROMPTS, method="integrated_gradients", target=ANSWERS, rule="adaptive_simpson"
    )
    for a, r, prompt in zip(adaptive, ref, PROMPTS, strict=True):
        assert (a.scores - r.scores).abs().sum() <= 3e-2 * r.scores.abs().sum(), prompt


def test_integration_rule_is_a_parameter(lm):
    kw = dict(method="integrated_gradients", target=ANSWERS[2], n_steps=8)
    gl = tokattr.attribute(lm, PROMPTS[2], **kw)
    trap = tokattr.attribute(lm, PROMPTS[2], rule="riemann_trapezoid", **kw)
    assert gl.params["rule"] == "gausslegendre" and trap.params["rule"] == "riemann_trapezoid"
    assert not torch.allclose(gl.scores, trap.scores)
    with pytest.raises(ValueError, match="unknown rule 'simpson'"):
        tokattr.attribute(lm, PROMPTS[2], rule="simpson", **kw)


@pytest.mark.parametrize(
    "method",
    ["integrated_gradients", "adaptive_ig", "occlusion", "kernel_shap", "input_x_gradient"],
)
def test_a_prompt_scores_the_same_alone_and_in_a_padded_batch(lm, method):
    params = {"n_samples": 64} if method == "kernel_shap" else {}
    if method == "adaptive_ig":  # each row refines its own nodes: no other row may move them
        method, params = "integrated_gradients", {"rule": "adaptive_simpson"}
    alone = tokattr.attribute(lm, PROMPTS[0], method=method, target=ANSWERS[0], seed=3, **params)
    batch = tokattr.attribute(
        lm, PROMPTS, method=method, target=ANSWERS, seed=[3, 4, 5, 6], **params
    )
    torch.testing.assert_close(batch[0].scores, alone.scores, rtol=1e-5, atol=1e-5)
