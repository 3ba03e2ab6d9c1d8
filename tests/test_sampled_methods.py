"""GradientShap, SmoothGrad, VarGrad and LIME against Captum (same target, seeds, samples)."""

from __future__ import annotations

import captum.attr
import numpy as np
import pytest
import torch
from _tiny import ARCHS, baseline_embeds, direct_log_prob, model_problem, tiny_lm, unpadded

from tokattr.attribution import attribute
from tokattr.methods import METHODS, GradientShap, Lime, SmoothGrad, VarGrad
from tokattr.methods.context_cite import lasso

PROMPT, ANSWER = "12+3=", "15"  # features: ▁ 1 2 + 3 =


def _on_features(lm, prompt=PROMPT, answer=ANSWER):
    """Captum's view of the prompt: the feature tokens' embeddings ``[1, n, d]``, their
    baselines, and ``f`` of them (BOS and the answer fixed), plus the full-row inputs."""
    ids, n_prompt, cols = unpadded(lm, prompt, answer)
    x, b = baseline_embeds(lm, ids, cols, "pad")

    def f_full(e):
        return direct_log_prob(lm, e, ids, n_prompt)

    def f(e):
        full = x.expand(e.shape[0], -1, -1).clone()
        full[:, cols] = e
        return f_full(full)

    return x[:, cols], b[:, cols], f, (x, b, cols, f_full)


def _seed_both(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stdev", [0.0, 0.05])
def test_gradient_shap_equals_captum(arch, stdev):
    lm = tiny_lm(arch)
    x, b, f, _ = _on_features(lm)
    res = attribute(lm, PROMPT, "gradient_shap", target=ANSWER, seed=5, n_samples=8, stdev=stdev)
    _seed_both(5)
    want = captum.attr.GradientShap(f).attribute(x, baselines=b, n_samples=8, stdevs=stdev)
    torch.testing.assert_close(res.scores, want[0].sum(-1), rtol=1e-4, atol=1e-6)
    assert res.model_evals == 8


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("base", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_noise_tunnel_equals_captum(arch, nt_type, base):
    lm = tiny_lm(arch)
    x, b, f, _ = _on_features(lm)
    params = dict(base=base, n_samples=6, stdev=0.05, n_steps=5)
    res = attribute(lm, PROMPT, nt_type, target=ANSWER, seed=3, **params)
    kwargs = {}
    if base == "saliency":
        inner = captum.attr.Saliency(f)  # abs=True: |grad|
    elif base == "input_x_gradient":
        inner = captum.attr.InputXGradient(f)
    else:
        inner = captum.attr.IntegratedGradients(f)
        kwargs = dict(baselines=b, n_steps=5, method="gausslegendre")
    _seed_both(3)
    want = captum.attr.NoiseTunnel(inner).attribute(
        x, nt_type=nt_type, nt_samples=6, stdevs=0.05, **kwargs
    )[0]
    reduced = (
        want.norm(dim=-1) if (base == "saliency" and nt_type == "smoothgrad") else want.sum(-1)
    )
    torch.testing.assert_close(res.scores, reduced, rtol=1e-4, atol=1e-6)
    assert res.model_evals == 6 * (5 if base == "integrated_gradients" else 1)
    if nt_type == "vargrad":
        assert (res.scores >= -1e-6).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_lime_equals_captum(arch):
    pytest.importorskip("sklearn")
    from captum._utils.models.linear_model import SkLearnLasso

    lm = tiny_lm(arch)
    _, _, _, (x, b, cols, f_full) = _on_features(lm)
    groups = torch.zeros(1, x.shape[1], x.shape[2], dtype=torch.long)
    groups[0, cols] = torch.arange(len(cols))[:, None]  # BOS/answer: group 0, baseline = input
    res = attribute(lm, PROMPT, "lime", target=ANSWER, seed=11, n_samples=40, alpha=0.001)
    torch.manual_seed(11)
    # Captum's default model is SkLearnLasso(alpha=0.01) at scikit-learn's default tolerance
    # (1e-4 on the duality gap); tightened here so both solve the same problem to convergence
    # (as far as Captum's float32 inputs allow).
    model = SkLearnLasso(alpha=0.001, tol=1e-6, max_iter=100_000)
    lime = captum.attr.Lime(f_full, interpretable_model=model)
    with torch.no_grad():
        want = lime.attribute(x, baselines=b, feature_mask=groups, n_samples=40)[0, cols, 0]
    torch.testing.assert_close(res.scores, want.float(), rtol=1e-4, atol=1e-5)


def test_lime_defaults_are_captums():
    lime = captum.attr.Lime(lambda e: e.sum(-1))
    assert lime.interpretable_model.construct_kwargs == {"alpha": Lime().alpha}
    sim = lime.similarity_func(torch.ones(1, 4), torch.tensor([[1.0, 0, 1, 0]]), None)
    d = 1 - 2 / (2 * 2**0.5)  # cosine distance of (1,1,1,1) and (1,0,1,0)
    assert sim == pytest.approx(np.exp(-(d**2) / (2 * Lime().kernel_width ** 2)))


def test_weighted_lasso_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(80, 7, generator=gen) > 0.5).double()
    y = x @ torch.tensor([2.0, -1.0, 0.0, 0.5, 0.0, 3.0, -0.2], dtype=torch.float64) + 0.3
    w = torch.rand(80, generator=gen).double() + 0.1
    weight, bias = lasso(x, y, 0.05, sample_weight=w, standardize=False)
    ref = sklearn.Lasso(alpha=0.05, tol=1e-12, max_iter=100_000)
    ref.fit(x.numpy(), y.numpy(), sample_weight=w.numpy())
    np.testing.assert_allclose(weight.numpy(), ref.coef_, rtol=1e-6, atol=1e-9)
    assert float(bias) == pytest.approx(ref.intercept_, abs=1e-8)


@pytest.mark.parametrize("name", ["gradient_shap", "smoothgrad", "vargrad", "lime"])
def test_a_row_does_not_depend_on_its_batch(name):
    """Seeded per row: a prompt's scores are the same alone and among others."""
    lm = tiny_lm("llama")
    params = {"n_samples": 6}
    prompts, answers = ["7x5=", "12+34=", "9="], ["35", "46", "9999"]
    together = attribute(lm, prompts, name, target=answers, seed=2, **params)
    alone = attribute(lm, prompts[1], name, target=answers[1], seed=2, **params)
    torch.testing.assert_close(together[1].scores, alone.scores, rtol=1e-4, atol=1e-6)


def test_group_size_bounds_memory(monkeypatch):
    """Rows taken a few at a time (tiny accumulator budget) give the same scores."""
    import tokattr.methods.sampled_gradients as sg

    lm = tiny_lm("llama")
    problem, _ = model_problem(lm, ["7x5=", "12+34=", "9="], ["35", "46", "9999"])
    method = SmoothGrad(base="integrated_gradients", n_samples=3, stdev=0.05, n_steps=3)
    whole = method.attribute(problem).scores
    monkeypatch.setattr(sg, "ACCUMULATOR_BYTES", 1)
    assert len(sg.row_groups(problem, per_row=6)) == 3
    torch.testing.assert_close(method.attribute(problem).scores, whole, rtol=1e-5, atol=1e-7)
    shap = GradientShap(n_samples=4, stdev=0.05)
    small = shap.attribute(problem).scores
    monkeypatch.undo()
    torch.testing.assert_close(shap.attribute(problem).scores, small, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "cls,params,message",
    [
        (GradientShap, {"n_samples": 0}, "n_samples"),
        (GradientShap, {"stdev": -1.0}, "stdev"),
        (SmoothGrad, {"base": "occlusion"}, "unknown base"),
        (VarGrad, {"stdev": 0.0}, "stdev"),
        (SmoothGrad, {"n_steps": 0}, "n_steps"),
        (Lime, {"n_samples": 1}, "n_samples"),
        (Lime, {"kernel_width": 0}, "kernel_width"),
        (Lime, {"alpha": -0.1}, "alpha"),
    ],
)
def test_bad_parameters_are_refused(cls, params, message):
    with pytest.raises(ValueError, match=message):
        cls(**params)


def test_registered():
    for name, cls in [
        ("gradient_shap", GradientShap),
        ("smoothgrad", SmoothGrad),
        ("vargrad", VarGrad),
        ("lime", Lime),
    ]:
        assert METHODS[name] is cls
