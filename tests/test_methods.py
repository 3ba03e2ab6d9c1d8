"""Each method against a reference: Captum, autograd, brute force, or a known answer."""

from __future__ import annotations

import dataclasses
import itertools
import math

import captum.attr
import numpy as np
import pytest
import torch
from _tiny import ARCHS, baseline_embeds, direct_log_prob, model_problem, tiny_lm, unpadded

from tokattr.attribution import attribute
from tokattr.methods import (
    METHODS,
    ExactShapley,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Occlusion,
    Saliency,
    ShapleyValueSampling,
)
from tokattr.methods.exact_shapley import shapley_from_values
from tokattr.methods.kernel_shap import WeightedLeastSquares, shapley_kernel_samples
from tokattr.methods.problem import AttributionProblem, seeded
from tokattr.targets import TargetInputs

PROMPT, ANSWER = "12+3=", "15"  # features: ▁ 1 2 + 3 =


# --------------------------------------------------------------------------- synthetic games


def synthetic_problem(fn, x: torch.Tensor, batch_size: int = 8, seed: int | None = 0):
    """One row ``[BOS] + n features + [answer]`` whose target is ``fn(features [rows, n, d])``.

    Removing a feature sets it to the zero vector. The forward checks that BOS and the answer
    column are never perturbed.
    """
    n, d = x.shape
    bos, ans = torch.full((1, d), 5.0), torch.full((1, d), 7.0)
    embeds = torch.cat([bos, x, ans])[None]  # [1, n+2, d]
    feature_mask = torch.tensor([[False] + [True] * n + [False]])
    baselines = torch.where(feature_mask[..., None], torch.zeros(()), embeds)
    seq = n + 2
    inputs = TargetInputs(
        attention_mask=torch.ones(1, seq, dtype=torch.long),
        position_ids=torch.arange(seq)[None],
        labels=torch.zeros(1, seq, dtype=torch.long),
        score_mask=torch.arange(seq)[None] == seq - 1,
        slot_mask=torch.arange(seq)[None] == seq - 1,
        example_index=torch.zeros(1, dtype=torch.long),
    )

    def forward(e: torch.Tensor, rows: TargetInputs) -> torch.Tensor:
        torch.testing.assert_close(e[:, 0], bos.expand(e.shape[0], d))
        torch.testing.assert_close(e[:, -1], ans.expand(e.shape[0], d))
        assert e.shape[0] <= batch_size
        return fn(e[:, 1 : n + 1])

    return AttributionProblem(forward, embeds, baselines, feature_mask, inputs, batch_size, (seed,))


def features(out, n):
    assert (out.scores[:, 0] == 0).all() and (out.scores[:, -1] == 0).all()
    return out.scores[0, 1 : n + 1]


def test_occlusion_on_an_additive_function_returns_each_term():
    torch.manual_seed(1)
    x, w = torch.randn(5, 3), torch.randn(5, 3)

    def fn(e):  # sum_j g_j(e_j), g_j(v) = sin(w_j . v); g_j(0) = 0
        return torch.sin((e * w).sum(-1)).sum(-1)

    out = Occlusion().attribute(synthetic_problem(fn, x))
    torch.testing.assert_close(features(out, 5), torch.sin((x * w).sum(-1)))


@pytest.mark.parametrize("method", [KernelShap(n_samples=16), ShapleyValueSampling(n_samples=3)])
def test_a_single_token_gets_the_whole_gap(method):
    """One feature: its Shapley value is f(x) - f(baseline) (Captum's KernelShap cannot sample
    coalitions of one token; tokattr evaluates the two ends)."""
    x = torch.randn(1, 3)
    out = method.attribute(synthetic_problem(lambda e: (e**2).sum((-1, -2)) + 1.0, x))
    torch.testing.assert_close(features(out, 1), (x**2).sum()[None])


def test_saliency_and_input_x_gradient_on_a_linear_function():
    torch.manual_seed(2)
    x, w = torch.randn(4, 3), torch.randn(4, 3)

    def fn(e):
        return (e * w).sum((-1, -2))

    problem = synthetic_problem(fn, x)
    torch.testing.assert_close(features(Saliency().attribute(problem), 4), w.norm(dim=-1))
    torch.testing.assert_close(features(InputXGradient().attribute(problem), 4), (x * w).sum(-1))


def test_integrated_gradients_on_a_quadratic_is_exact():
    """f = sum_j (w_j . e_j)^2: IG_j = (w_j . x_j)^2 exactly (baseline 0), up to quadrature."""
    torch.manual_seed(3)
    x, w = torch.randn(4, 3), torch.randn(4, 3)
    out = IntegratedGradients(n_steps=16).attribute(
        synthetic_problem(lambda e: ((e * w).sum(-1) ** 2).sum(-1), x)
    )
    torch.testing.assert_close(features(out, 4), (x * w).sum(-1) ** 2)
    assert abs(float(out.delta[0])) < 1e-4


def test_adaptive_simpson_is_exact_where_simpson_is():
    """f = sum_j (w_j . e_j)^3: the path integrand is quadratic in alpha, so one Simpson panel
    (3 nodes) already gives IG_j = (w_j . x_j)^3; more nodes change nothing."""
    torch.manual_seed(4)
    x, w = torch.randn(4, 3), torch.randn(4, 3)
    for n_steps in (3, 4, 17):
        out = IntegratedGradients(n_steps=n_steps, rule="adaptive_simpson").attribute(
            synthetic_problem(lambda e: ((e * w).sum(-1) ** 3).sum(-1), x)
        )
        torch.testing.assert_close(features(out, 4), (x * w).sum(-1) ** 3)
        assert abs(float(out.delta[0])) < 1e-4


def _sharp_problem(batch_size: int = 8):
    """A separable target with a steep step per token, at a different point of the path for
    each: IG_j = g_j(x_j) - g_j(0) exactly (the path integral of a separable function)."""
    torch.manual_seed(5)
    x = torch.randn(3, 4)
    w = x / (x * x).sum(-1, keepdim=True)  # w_j . x_j = 1: token j's step sits at alpha = s_j
    s = torch.tensor([0.23, 0.51, 0.77])

    def g(e):  # [rows, 3, d] -> [rows, 3]
        return torch.tanh(60 * ((e * w).sum(-1) - s))

    exact = g(x[None])[0] - g(torch.zeros(1, 3, 4))[0]
    return synthetic_problem(lambda e: g(e).sum(-1), x, batch_size=batch_size), exact


def test_adaptive_simpson_puts_the_steps_where_the_path_is_steep():
    """65 gradient evaluations: Gauss-Legendre misses a token's score by over 1% (2.5% when
    written), the adaptive rule (refining the panels whose completeness residual is largest)
    gets every token to 1e-3 (4e-4); both reach the exact values with 1,025 nodes."""
    problem, exact = _sharp_problem()
    errors = {}
    for rule in ("gausslegendre", "adaptive_simpson"):
        out = IntegratedGradients(n_steps=65, rule=rule).attribute(problem)
        errors[rule] = ((features(out, 3) - exact).abs() / exact.abs()).max().item()
    assert errors["adaptive_simpson"] < 1e-3 < 1e-2 < errors["gausslegendre"], errors
    for rule in ("gausslegendre", "adaptive_simpson"):
        out = IntegratedGradients(n_steps=1025, rule=rule).attribute(problem)
        torch.testing.assert_close(features(out, 3), exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_steps, used", [(3, 3), (4, 3), (64, 63), (65, 65)])
def test_adaptive_simpson_spends_n_steps_gradient_evaluations(n_steps, used):
    """Nodes come in Simpson pairs: an even ``n_steps`` leaves one unused; every evaluation is a
    distinct point of the path, and ``f(x)``, ``f(baseline)`` take two more forwards."""
    problem, _ = _sharp_problem(batch_size=4)
    seen = []
    inner = problem.forward

    def counting(e, rows):
        seen.append(e.detach()[:, 1:-1].clone())
        return inner(e, rows)

    problem = dataclasses.replace(problem, forward=counting)
    IntegratedGradients(n_steps=n_steps, rule="adaptive_simpson").attribute(problem)
    points = torch.cat(seen)
    assert len(points) == used + 2
    assert len(torch.unique(points.flatten(1), dim=0)) == used  # the ends are evaluated twice


def test_adaptive_simpson_needs_three_steps():
    with pytest.raises(ValueError, match="'adaptive_simpson' needs n_steps >= 3"):
        IntegratedGradients(n_steps=2, rule="adaptive_simpson")


def _known_game(e):
    """v(S) = sum a_i + 1.5 [0,1 in S] + 0.9 [2,3,4 in S], presence = feature != 0."""
    present = (e.abs().sum(-1) > 0).double()  # [rows, n]
    a = torch.arange(1, present.shape[1] + 1, dtype=torch.float64) / 10
    pair = present[:, 0] * present[:, 1]
    triple = present[:, 2] * present[:, 3] * present[:, 4]
    return (present * a).sum(-1) + 1.5 * pair + 0.9 * triple


def _known_values(n):
    phi = torch.arange(1, n + 1, dtype=torch.float64) / 10
    phi[:2] += 1.5 / 2
    phi[2:5] += 0.9 / 3
    return phi


def test_exact_shapley_known_values_and_efficiency():
    n = 7
    out = ExactShapley().attribute(synthetic_problem(_known_game, torch.ones(n, 2), batch_size=16))
    phi = features(out, n).double()
    torch.testing.assert_close(phi, _known_values(n), atol=1e-6, rtol=1e-6)
    full, empty = _known_game(torch.ones(1, n, 2)), _known_game(torch.zeros(1, n, 2))
    assert abs(float(phi.sum() - (full - empty)[0])) < 1e-5


def test_shapley_from_values_matches_the_permutation_definition():
    torch.manual_seed(4)
    n = 4
    values = torch.randn(2**n, dtype=torch.float64)
    want = torch.zeros(n, dtype=torch.float64)
    for order in itertools.permutations(range(n)):
        coalition = 0
        for i in order:
            want[i] += values[coalition | (1 << i)] - values[coalition]
            coalition |= 1 << i
    torch.testing.assert_close(shapley_from_values(values, n), want / math.factorial(n))


@pytest.mark.parametrize(
    ("method", "sizes"),
    [(KernelShap, (16, 128, 1024)), (ShapleyValueSampling, (2, 16, 128))],
)
def test_sampling_error_to_exact_shapley_shrinks_with_samples(method, sizes):
    n = 7
    exact = _known_values(n)

    def error(n_samples):
        errs = []
        for seed in range(4):
            problem = synthetic_problem(_known_game, torch.ones(n, 2), batch_size=64, seed=seed)
            phi = features(method(n_samples=n_samples).attribute(problem), n).double()
            errs.append(float((phi - exact).norm()))
        return np.mean(errs)

    errors = [error(s) for s in sizes]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.4 * errors[0], errors


def test_exact_shapley_refuses_too_many_tokens():
    problem = synthetic_problem(_known_game, torch.ones(6, 2))
    with pytest.raises(ValueError, match="6 features, more than max_tokens=5"):
        ExactShapley(max_tokens=5).attribute(problem)


def test_weighted_least_squares_matches_numpy():
    torch.manual_seed(5)
    x = (torch.rand(40, 6) > 0.5).float()
    y, w = torch.randn(40), torch.rand(40) + 0.1
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, w), batch_size=40)
    model = WeightedLeastSquares()
    model.fit(data)
    design = np.hstack([x.numpy(), np.ones((40, 1))]).astype(np.float64)
    root = np.sqrt(w.numpy().astype(np.float64))[:, None]
    sol = np.linalg.lstsq(design * root, y.numpy()[:, None] * root, rcond=None)[0][:, 0]
    np.testing.assert_allclose(model.representation()[0].numpy(), sol[:-1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- tiny models


def _captum_inputs(lm, prompt=PROMPT, answer=ANSWER, how="pad"):
    ids, n_prompt, cols = unpadded(lm, prompt, answer)
    x, b = baseline_embeds(lm, ids, cols, how)
    groups = torch.zeros(1, ids.shape[0], x.shape[-1], dtype=torch.long)
    groups[0, cols] = torch.arange(len(cols))[:, None]  # BOS/answer: group 0, baseline = input

    def f(e):
        return direct_log_prob(lm, e, ids, n_prompt)

    return cols, x, b, groups, f


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", ["pad", "unk", "zero"])
def test_occlusion_equals_brute_force(arch, how):
    lm = tiny_lm(arch)
    cols, x, b, _, f = _captum_inputs(lm, how=how)
    res = attribute(lm, PROMPT, "occlusion", target=ANSWER, baseline=how)
    removed = x.repeat(len(cols), 1, 1)  # [n, seq, d] row k: token k removed
    removed[torch.arange(len(cols)), cols] = b[0, cols]
    with torch.no_grad():
        want = f(x)[0] - f(removed)
    # Packed passes (a custom attention mask) round differently from plain ones.
    torch.testing.assert_close(res.scores, want, rtol=1e-4, atol=1e-5)
    assert res.model_evals == 1 + len(cols)


def test_packed_passes_share_sequences_and_keep_to_the_pass_size():
    """Occlusion's packed passes: every tree once, packed sequences no wider than the largest
    tree and nearly full (first-fit decreasing), per_pass(width, scored) of them a pass,
    whatever the order the rows come in."""
    from tokattr.engine.loo import _plan_passes

    gen = np.random.default_rng(0)
    sizes = gen.integers(5, 150, size=40).tolist()
    scored = [s // 4 for s in sizes]
    trees = list(range(0, 40, 2))  # some rows are not packed at all
    width = max(sizes[r] for r in trees)

    def per_pass(w, keep):
        assert w == width and 0 < keep <= width // 4  # the scored tokens of a full sequence
        return 3

    bins, n = _plan_passes(trees, sizes, scored, per_pass)
    assert n == 3 and sorted(r for b in bins for r in b) == trees
    fill = [sum(sizes[r] for r in b) for b in bins]
    assert max(fill) <= width
    assert sum(fill) > 0.8 * width * len(bins)  # little padding
    assert len(bins) < len(trees)
    assert (bins, n) == _plan_passes(trees[::-1], sizes, scored, per_pass)
    assert _plan_passes(trees, sizes, scored, lambda w, k: 0)[1] == 1  # never below one


def test_occlusion_windows_equal_brute_force():
    lm = tiny_lm("llama")
    cols, x, b, _, f = _captum_inputs(lm)
    n = len(cols)
    for window, stride in [(3, 1), (2, 2)]:
        res = attribute(lm, PROMPT, "occlusion", target=ANSWER, window=window, stride=stride)
        starts = list(range(0, n - window + 1, stride))
        removed = x.repeat(len(starts), 1, 1)  # [windows, seq, d]
        for k, start in enumerate(starts):
            removed[k, cols[start : start + window]] = b[0, cols[start : start + window]]
        with torch.no_grad():
            drops = f(x)[0] - f(removed)  # [windows]
        total, count = torch.zeros(n), torch.zeros(n)
        for k, start in enumerate(starts):
            total[start : start + window] += drops[k]
            count[start : start + window] += 1
        assert (count > 0).all()
        torch.testing.assert_close(res.scores, total / count, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_shapley_equals_brute_force(arch):
    lm = tiny_lm(arch)
    cols, x, b, _, f = _captum_inputs(lm)
    n = len(cols)
    res = attribute(lm, PROMPT, "exact_shapley", target=ANSWER, batch_size=16)
    subsets = [frozenset(s) for k in range(n + 1) for s in itertools.combinations(range(n), k)]
    kept = b.repeat(len(subsets), 1, 1)  # [2^n, seq, d]
    for row, s in enumerate(subsets):
        kept[row, cols[sorted(s)]] = x[0, cols[sorted(s)]]
    with torch.no_grad():
        value = dict(zip(subsets, f(kept).tolist(), strict=True))
    want = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for s, v in value.items():
            if i not in s:
                w = math.factorial(len(s)) * math.factorial(n - len(s) - 1) / math.factorial(n)
                want[i] += w * (value[s | {i}] - v)
    torch.testing.assert_close(res.scores.double(), want, rtol=1e-4, atol=1e-6)
    # Efficiency: the scores add up to f(all tokens) - f(no token).
    assert abs(float(res.scores.sum()) - (value[frozenset(range(n))] - value[frozenset()])) < 1e-5
    assert res.model_evals == 2**n


@pytest.mark.parametrize("arch", ARCHS)
def test_integrated_gradients_equals_captum_and_is_complete(arch):
    lm = tiny_lm(arch)
    cols, x, b, _, f = _captum_inputs(lm)
    res = attribute(lm, PROMPT, "integrated_gradients", target=ANSWER, n_steps=64, batch_size=32)
    ig = captum.attr.IntegratedGradients(f)
    want = ig.attribute(x, baselines=b, n_steps=64, method="gausslegendre")[0, cols].sum(-1)
    torch.testing.assert_close(res.scores, want.float(), rtol=1e-4, atol=1e-5)
    # Completeness: sum of scores = f(x) - f(baseline) (Sundararajan et al. 2017, prop. 1).
    with torch.no_grad():
        gap = float(f(x)[0] - f(b)[0])
    assert abs(float(res.scores.sum()) - gap) <= 1e-2 * abs(gap)
    assert abs(res.delta) <= 1e-2 * abs(gap)
    assert res.model_evals == 64 + 2  # the path, plus f(x) and f(baseline) for the delta


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_methods_equal_autograd(arch):
    lm = tiny_lm(arch)
    cols, x, _, _, f = _captum_inputs(lm)
    e = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(e).sum(), e)
    sal = attribute(lm, PROMPT, "saliency", target=ANSWER)
    ixg = attribute(lm, PROMPT, "input_x_gradient", target=ANSWER)
    torch.testing.assert_close(sal.scores, grad[0, cols].norm(dim=-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ixg.scores, (grad * x)[0, cols].sum(-1), rtol=1e-4, atol=1e-6)
    captum_sal = (
        captum.attr.Saliency(f)
        .attribute(x.clone().requires_grad_(), abs=True)[0, cols]
        .norm(dim=-1)
    )
    captum_ixg = (
        captum.attr.InputXGradient(f).attribute(x.clone().requires_grad_())[0, cols].sum(-1)
    )
    torch.testing.assert_close(sal.scores, captum_sal, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ixg.scores, captum_ixg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_shap_equals_captum_with_the_same_seed(arch):
    lm = tiny_lm(arch)
    cols, x, b, groups, f = _captum_inputs(lm)
    res = attribute(lm, PROMPT, "kernel_shap", target=ANSWER, seed=7, n_samples=60, batch_size=16)
    shap = captum.attr.KernelShap(f)
    # scikit-learn (Captum's default solver) is not a dependency; same problem, exact solver.
    shap.interpretable_model = WeightedLeastSquares()
    torch.manual_seed(7)
    with torch.no_grad():
        want = shap.attribute(
            x, baselines=b, feature_mask=groups, n_samples=60, perturbations_per_eval=20
        )[0, cols, 0]
    torch.testing.assert_close(res.scores, want, rtol=1e-4, atol=1e-5)
    with seeded(7):
        coalitions, _ = shapley_kernel_samples(len(cols), 60)
    # Each distinct coalition runs once (38 of the 60 here).
    assert res.model_evals == len(torch.unique(coalitions, dim=0)) < 60


@pytest.mark.parametrize("n_samples", [60, 4])
def test_kernel_shap_equals_captum_with_scikit_learn(n_samples):
    """Also with fewer coalitions than tokens (4 < 6), where the fit is under-determined: on
    this small case tokattr's float64 minimum-norm solution and scikit-learn's agree (on larger
    under-determined fits Captum's float32 inputs can make them differ; see bench/)."""
    pytest.importorskip("sklearn")
    lm = tiny_lm("llama")
    cols, x, b, groups, f = _captum_inputs(lm)
    res = attribute(lm, PROMPT, "kernel_shap", target=ANSWER, seed=7, n_samples=n_samples)
    torch.manual_seed(7)
    with torch.no_grad():
        want = captum.attr.KernelShap(f).attribute(
            x, baselines=b, feature_mask=groups, n_samples=n_samples
        )[0, cols, 0]
    torch.testing.assert_close(res.scores, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapley_sampling_equals_captum_with_the_same_seed(arch):
    lm = tiny_lm(arch)
    cols, x, b, groups, f = _captum_inputs(lm)
    res = attribute(lm, PROMPT, "shapley_sampling", target=ANSWER, seed=3, n_samples=5)
    torch.manual_seed(3)
    with torch.no_grad():
        want = captum.attr.ShapleyValueSampling(f).attribute(
            x, baselines=b, feature_mask=groups, n_samples=5, perturbations_per_eval=len(cols)
        )[0, cols, 0]
    torch.testing.assert_close(res.scores, want, rtol=1e-4, atol=1e-6)
    # Each distinct coalition runs once: the empty one, then every permutation's prefixes (the
    # whole prompt ends all five).
    n = len(cols)
    with seeded(3):
        perms = [torch.randperm(n).tolist() for _ in range(5)]
    coalitions = {frozenset()} | {frozenset(p[: i + 1]) for p in perms for i in range(n)}
    assert res.model_evals == len(coalitions) <= 1 + 5 * n - 4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scores_are_exactly_zero_off_the_features(method):
    """BOS, left padding, the answer and right padding get exactly 0, whatever the method."""
    lm = tiny_lm("llama")
    problem, batch = model_problem(lm, ["7x5=", "12+34=", "9="], ["35", "46", "9999"])
    params = {"n_steps": 4} if method == "integrated_gradients" else {}
    if method in ("kernel_shap", "shapley_sampling"):
        params = {"n_samples": 8}
    out = METHODS[method](**params).attribute(problem)
    assert out.scores.shape == batch.input_ids.shape and out.scores.dtype == torch.float32
    assert (out.scores[~batch.feature_mask] == 0).all()
    assert (out.scores[batch.feature_mask] != 0).float().mean() > 0.5  # not all zero


def test_every_method_is_tested_here():
    covered = {
        "integrated_gradients", "saliency", "input_x_gradient", "occlusion", "kernel_shap",
        "shapley_sampling", "exact_shapley", "random",
        "context_cite",  # against scikit-learn and an additive target: test_feature_attribution
        "gradient_shap", "smoothgrad", "vargrad", "lime",  # against Captum: test_sampled_methods
        "attention", "attention_rollout", "value_zeroing",  # test_attention_methods
        "attnlrp", "cp_lrp",  # rules by hand and conservation: test_lrp
    }  # fmt: skip
    assert set(METHODS) == covered


def test_perturbation_passes_hand_back_ordinary_tensors():
    """evaluate and interpolate run the model under inference_mode (faster) but return tensors
    a method may change in place or use with autograd."""
    lm = tiny_lm("llama")
    problem, _ = model_problem(lm, ["7x5=", "12+34="], ["35", "46"])
    rows = torch.tensor([0, 1, 1])
    keep = torch.ones(3, int(problem.n_features.max()), dtype=torch.bool)
    out = problem.evaluate(rows, keep)
    mid = problem.interpolate(rows, keep.float() / 2)
    assert not out.is_inference() and not mid.is_inference()
    out += 1.0  # in place: allowed on an ordinary tensor
    assert (mid.requires_grad_() * 2).sum().requires_grad
