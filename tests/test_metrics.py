"""Faithfulness metrics against NumPy / SciPy / scikit-learn references and brute force;
every class against its function."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch
from _tiny import baseline_embeds, direct_log_prob, model_problem, tiny_lm, unpadded

from tokattr.methods import ExactShapley, IntegratedGradients, Occlusion, RandomAttribution
from tokattr.methods.problem import AttributionProblem, MethodOutput
from tokattr.metrics import APPLIES_TO, METRICS, ExactShapleyCache, MetricInputs, applies
from tokattr.metrics import functional as F
from tokattr.metrics.classes import (
    LDS,
    CompletenessError,
    Comprehensiveness,
    DeletionAUC,
    DeletionAUCNormalised,
    Infidelity,
    InsertionAUC,
    InsertionAUCNormalised,
    LooKendallTau,
    MaxSensitivity,
    PlausibilityAUPRC,
    PlausibilityPrecision,
    PlausibilityTop1,
    RandomizationSpearman,
    ShapleyError,
    SoftComprehensiveness,
    SoftSufficiency,
    Sufficiency,
)
from tokattr.metrics.ranking import (
    FRACTIONS,
    average_precision,
    expected_average_precision,
    kendall_tau,
    normalised_auc,
    spearman,
    tie_averaged_precision,
    top_k_sizes,
)
from tokattr.targets import TargetInputs

# --------------------------------------------------------------------------- a synthetic batch
# Rows of different lengths, left-padded like real batches: [pad…][BOS][features][answer].
# The target is f(E) = sum_j w_j <e_j, u> + c (sum_j <e_j, v>)^2 over the feature embeddings,
# so interactions matter; removing a feature sets its embedding to the zero vector.

D = 3
U, V = np.array([1.0, -0.5, 0.25]), np.array([0.3, 0.2, -0.4])
C = 0.7


def f_numpy(E: np.ndarray, w: np.ndarray) -> float:
    """``E [n, d]`` feature embeddings (removed ones are 0), ``w [n]``."""
    return float((w * (E @ U)).sum() + C * (E @ V).sum() ** 2)


def make_batch(lengths=(5, 3, 7, 1), seed=0, batch_size=6):
    g = torch.Generator().manual_seed(seed)
    n_max = max(lengths)
    seq = n_max + 2
    rows = len(lengths)
    embeds = torch.zeros(rows, seq, D, dtype=torch.float64)
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    weights = torch.zeros(rows, seq, dtype=torch.float64)
    for b, n in enumerate(lengths):
        start = seq - 1 - n
        embeds[b, start - 1] = 9.0  # BOS
        embeds[b, start : seq - 1] = torch.randn(n, D, generator=g, dtype=torch.float64)
        embeds[b, -1] = -3.0  # answer slot
        mask[b, start : seq - 1] = True
        weights[b, start : seq - 1] = torch.randn(n, generator=g, dtype=torch.float64)
    baselines = torch.where(mask[..., None], torch.zeros((), dtype=torch.float64), embeds)
    u, v = torch.tensor(U), torch.tensor(V)
    inputs = TargetInputs(
        attention_mask=torch.ones(rows, seq, dtype=torch.long),
        position_ids=torch.arange(seq).expand(rows, seq),
        labels=weights,  # carries each row's weights through select()
        score_mask=mask,  # carries the feature mask through select()
        slot_mask=torch.zeros(rows, seq, dtype=torch.bool),
        example_index=torch.arange(rows),
    )

    def forward(x: torch.Tensor, inp: TargetInputs) -> torch.Tensor:
        assert x.shape[0] <= batch_size
        feats = torch.where(inp.score_mask[..., None], x, torch.zeros_like(x))
        return (inp.labels * (feats @ u)).sum(-1) + C * (feats @ v).sum(-1) ** 2

    problem = AttributionProblem(
        forward, embeds, baselines, mask, inputs, batch_size, tuple(range(rows))
    )
    return problem, weights


def feats_of(problem, b):
    """Row b's feature embeddings [n, d] and weights [n] as NumPy."""
    m = problem.feature_mask[b]
    return problem.embeds[b][m].numpy(), problem.inputs.labels[b][m].numpy()


def random_scores(problem, seed=1, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(problem.feature_mask.shape, generator=g)
    if ties:
        s = torch.round(s)
    return torch.where(problem.feature_mask, s, torch.zeros_like(s))


def order_numpy(s: np.ndarray) -> np.ndarray:
    """Attribution order: descending score, ties by position."""
    return np.array(sorted(range(len(s)), key=lambda j: (-s[j], j)))


def curves_numpy(E, w, s):
    n = len(s)
    order = order_numpy(s)
    dele, ins = [], []
    for i in range(n + 1):
        top = np.zeros(n, bool)
        top[order[:i]] = True
        dele.append(f_numpy(np.where(top[:, None], 0.0, E), w))
        ins.append(f_numpy(np.where(top[:, None], E, 0.0), w))
    return np.array(dele), np.array(ins)


def scipy_stat(fn, x, y) -> float:
    """A SciPy correlation, NaN (without SciPy's warning) where it is undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic)


# --------------------------------------------------------------------------- pure arithmetic


def test_top_k_sizes():
    n = torch.tensor([1, 2, 13, 30, 100])
    k = top_k_sizes(n).tolist()
    assert k == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 2, 3, 7], [1, 2, 3, 6, 15],
                 [1, 5, 10, 20, 50]]  # fmt: skip
    with pytest.raises(ValueError, match="fractions"):
        top_k_sizes(n, (0.0,))


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlations_equal_scipy(ties):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    if ties:
        a, b = torch.round(a), torch.round(b * 0.7)
    mask = torch.arange(9)[None] < torch.tensor([9, 8, 5, 3, 2, 7])[:, None]
    tau, rho = kendall_tau(a, b, mask), spearman(a, b, mask)
    for r in range(6):
        x, y = a[r][mask[r]].numpy(), b[r][mask[r]].numpy()
        ref_tau = scipy_stat(scipy.stats.kendalltau, x, y)
        ref_rho = scipy_stat(scipy.stats.spearmanr, x, y)
        if math.isnan(ref_tau):
            assert math.isnan(tau[r])
        else:
            assert tau[r].item() == pytest.approx(ref_tau, abs=1e-12)
        if math.isnan(ref_rho):
            assert math.isnan(rho[r])
        else:
            assert rho[r].item() == pytest.approx(ref_rho, abs=1e-12)


def test_rank_correlations_are_nan_when_undefined():
    a = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert kendall_tau(a, b, mask).isnan().all()  # one entry; a constant side
    assert spearman(a, b, mask).isnan().all()


def test_average_precision_equals_scikit_learn():
    g = torch.Generator().manual_seed(4)
    scores = torch.round(torch.randn(8, 12, generator=g) * 2)  # ties included
    labels = torch.randint(-1, 2, (8, 12), generator=g)
    labels[0] = -1  # no class at all
    labels[1, :] = 1  # positives only
    ap = average_precision(scores, labels)
    assert ap[:2].isnan().all()
    for r in range(2, 8):
        keep = labels[r] >= 0
        y, s = labels[r][keep].numpy(), scores[r][keep].numpy()
        if y.min() == y.max():
            assert math.isnan(ap[r])
        else:
            ref = sklearn.metrics.average_precision_score(y, s)
            assert ap[r].item() == pytest.approx(ref, abs=1e-12)


def test_normalised_auc_equals_numpy_trapezoid():
    curve = torch.tensor([[1.0, 0.5, 0.2, 0.0, math.nan], [1.0, 0.0, math.nan, math.nan, 7.0]])
    n = torch.tensor([3, 1])
    auc = normalised_auc(curve, n)
    assert auc[0].item() == pytest.approx(np.trapezoid([1, 0.5, 0.2, 0], dx=1 / 3))
    assert auc[1].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- model-evaluating


def test_erasure_metrics_equal_brute_force():
    problem, _ = make_batch()
    scores = random_scores(problem, ties=True)
    curves = F.erasure_curves(problem, scores)
    comp = F.comprehensiveness(problem, scores)
    suff = F.sufficiency(problem, scores)
    dele, ins = F.deletion_auc(problem, scores), F.insertion_auc(problem, scores)
    for b in range(problem.n_rows):
        E, w = feats_of(problem, b)
        s = scores[b][problem.feature_mask[b]].numpy()
        n = len(s)
        d_ref, i_ref = curves_numpy(E, w, s)
        np.testing.assert_allclose(curves.deletion[b, : n + 1].numpy(), d_ref, atol=1e-10)
        np.testing.assert_allclose(curves.insertion[b, : n + 1].numpy(), i_ref, atol=1e-10)
        fx, fb = d_ref[0], d_ref[-1]
        for j, frac in enumerate(FRACTIONS):
            k = max(1, math.ceil(frac * n - 1e-9))
            assert comp[b, j].item() == pytest.approx(fx - d_ref[k], abs=1e-10)
            assert suff[b, j].item() == pytest.approx(fx - i_ref[k], abs=1e-10)
        x = np.linspace(0, 1, n + 1)
        # Areas in units of f, from f(baseline); the normalised form only where the gap is wide.
        assert dele[b].item() == pytest.approx(np.trapezoid(d_ref - fb, x))
        assert ins[b].item() == pytest.approx(np.trapezoid(i_ref - fb, x))
        for min_gap in (1e-3, abs(fx - fb) + 1e-3):
            dn = F.deletion_auc_normalised_from_curves(curves, min_gap)[b].item()
            inn = F.insertion_auc_normalised_from_curves(curves, min_gap)[b].item()
            if abs(fx - fb) >= min_gap:
                assert dn == pytest.approx(np.trapezoid((d_ref - fb) / (fx - fb), x))
                assert inn == pytest.approx(np.trapezoid((i_ref - fb) / (fx - fb), x))
            else:
                assert math.isnan(dn) and math.isnan(inn)


@torch.no_grad()
def test_erasure_on_a_real_padded_batch_equals_unpadded_brute_force():
    lm = tiny_lm("llama")
    prompts, answers = ["12+3=", "7x45=", "1/2="], ["15", "315", "0.5"]
    problem, _ = model_problem(lm, prompts, answers)
    scores = random_scores(problem, seed=5)
    comp = F.comprehensiveness(problem, scores)
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids, n_prompt, cols = unpadded(lm, p, a)
        x, base = baseline_embeds(lm, ids, cols)
        s = scores[b][problem.feature_mask[b]].numpy()
        order = order_numpy(s)
        fx = direct_log_prob(lm, x, ids, n_prompt)
        for j, frac in enumerate(FRACTIONS):
            k = max(1, math.ceil(frac * len(s) - 1e-9))
            erased = x.clone()
            erased[0, cols[order[:k]]] = base[0, cols[order[:k]]]
            ref = fx - direct_log_prob(lm, erased, ids, n_prompt)
            assert comp[b, j].item() == pytest.approx(float(ref), abs=1e-4)


def test_leave_one_out_and_kendall_tau_equal_brute_force():
    problem, _ = make_batch()
    scores = random_scores(problem)
    drops = F.leave_one_out(problem)
    tau = F.loo_kendall_tau(problem, scores)
    for b in range(problem.n_rows):
        E, w = feats_of(problem, b)
        n = len(w)
        ref = [f_numpy(E, w) - f_numpy(np.where((np.arange(n) == j)[:, None], 0, E), w)
               for j in range(n)]  # fmt: skip
        np.testing.assert_allclose(drops[b, :n].numpy(), ref, atol=1e-10)
        s = scores[b][problem.feature_mask[b]].numpy()
        ref_tau = scipy_stat(scipy.stats.kendalltau, s, ref) if n > 1 else math.nan
        if math.isnan(ref_tau):
            assert math.isnan(tau[b])
        else:
            assert tau[b].item() == pytest.approx(ref_tau, abs=1e-12)


def test_occlusion_with_the_same_baseline_has_loo_tau_exactly_one():
    problem, _ = make_batch(lengths=(5, 7, 4))
    scores = Occlusion().attribute(problem).scores
    assert F.loo_kendall_tau(problem, scores).tolist() == [1.0, 1.0, 1.0]


def test_completeness_error_equals_numpy():
    problem, _ = make_batch()
    scores = random_scores(problem)
    err = F.completeness_error(problem, scores)
    for b in range(problem.n_rows):
        E, w = feats_of(problem, b)
        gap = f_numpy(E, w) - f_numpy(0 * E, w)
        ref = abs(scores[b].double().sum().item() - gap) / abs(gap)
        assert err[b].item() == pytest.approx(ref, rel=1e-9)
    # IG on this quadratic target is exact with Gauss-Legendre: completeness error ~ 0.
    ig = IntegratedGradients(n_steps=8).attribute(problem).scores
    assert F.completeness_error(problem, ig).max().item() < 1e-6  # float32 scores


def _infidelity_draws(problem, b, samples, n, perturbation, p=0.25, std=0.3):
    """Row b's perturbations ``[samples, n]``, drawn as the metric documents it."""
    g = torch.Generator().manual_seed(F.salted_seed(problem.seeds[b], F.INFIDELITY_SALT))
    if perturbation == "removal":
        return (torch.rand(samples, n, 1, generator=g)[..., 0] < p).double().numpy()
    return (torch.randn(samples, n, 1, generator=g)[..., 0] * std).double().numpy()


@pytest.mark.parametrize("perturbation", ["removal", "gaussian"])
def test_infidelity_equals_the_definition(perturbation):
    problem, _ = make_batch(lengths=(4, 6, 2))
    scores = random_scores(problem)
    samples = 5
    for normalize in (False, True):
        got = F.infidelity(problem, scores, samples, perturbation, 0.25, 0.3, normalize)
        for b in range(problem.n_rows):
            E, w = feats_of(problem, b)
            n = len(w)
            s = scores[b][problem.feature_mask[b]].numpy()
            noise = _infidelity_draws(problem, b, samples, n, perturbation)
            dots = noise @ s
            diffs = np.array([f_numpy(E, w) - f_numpy((1 - eps)[:, None] * E, w) for eps in noise])
            if normalize:
                beta = (dots * diffs).mean() / (dots**2).mean()
                dots = beta * dots
            ref = ((dots - diffs) ** 2).mean()
            assert got[b].item() == pytest.approx(ref, rel=1e-5)
    # The metric reports the root, on the scale of f.
    metric = Infidelity(n_perturb_samples=samples, perturbation=perturbation, noise_std=0.3)
    metric.update(MetricInputs(problem, scores))
    ref = F.infidelity(problem, scores, samples, perturbation, 0.25, 0.3).sqrt()
    torch.testing.assert_close(metric.per_example(), ref)


def test_infidelity_of_an_exact_additive_explanation_is_zero_not_nan():
    """On an additive target occlusion's scores predict every removal exactly; Captum's
    expanded square may round below 0 there, and the reported root must stay 0."""
    problem, _ = make_batch(lengths=(5, 3, 7, 4) * 4)
    u = torch.tensor(U)

    def additive(x, inp):
        feats = torch.where(inp.score_mask[..., None], x, torch.zeros_like(x))
        return (inp.labels * (feats @ u)).sum(-1)

    problem = dataclasses.replace(problem, forward=additive)
    scores = Occlusion().attribute(problem).scores
    metric = Infidelity(n_perturb_samples=16)
    metric.update(MetricInputs(problem, scores))
    values = metric.per_example()
    assert not values.isnan().any() and values.max().item() < 1e-3


@torch.no_grad()
def test_infidelity_equals_captum_on_a_real_model():
    """``captum.metrics.infidelity`` called on the model directly (a forward written here on
    the unpadded prompt's embeddings, the same perturbations): the same value per example."""
    import captum.metrics

    lm = tiny_lm("llama")
    prompts, answers = ["12+3=", "7x45=", "1/2="], ["15", "315", "0.5"]
    problem, _ = model_problem(lm, prompts, answers)
    scores = random_scores(problem, seed=3)
    samples = 6
    for perturbation in ("removal", "gaussian"):
        got = F.infidelity(problem, scores, samples, perturbation, 0.25, 0.05)
        for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            ids, n_prompt, cols = unpadded(lm, p, a)
            x, base = baseline_embeds(lm, ids, cols)
            n = len(cols)
            draws = torch.tensor(_infidelity_draws(problem, b, samples, n, perturbation, std=0.05))

            def forward(alpha, x=x, base=base, cols=cols, ids=ids, n_prompt=n_prompt):
                e = x.expand(alpha.shape[0], -1, -1).clone()
                a_ = alpha[..., None].to(e.dtype)
                e[:, cols] = base[:, cols] + a_ * (x[:, cols] - base[:, cols])
                return direct_log_prob(lm, e, ids, n_prompt)

            def perturb(alpha, draws=draws):
                return draws.float(), alpha - draws.float()

            s = scores[b][problem.feature_mask[b]][None]
            ref = captum.metrics.infidelity(
                forward, perturb, torch.ones(1, n), s, n_perturb_samples=samples, normalize=True
            )
            assert got[b].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


def _soft_numpy(p, p0, kept, removed):
    """Zhao & Aletras (2023), eqs. for Soft-NS and Soft-NC, one mask at a time, averaged."""
    suff = lambda p_: 1 - max(0.0, p - p_)  # noqa: E731
    s0 = suff(p0)
    ns = np.mean([max(0.0, suff(k) - s0) / (1 - s0) for k in kept])
    nc = np.mean([max(0.0, p - r) / (1 - s0) for r in removed])
    return ns, nc


def test_soft_sufficiency_and_comprehensiveness_equal_numpy():
    problem, _ = make_batch(lengths=(5, 3, 7, 4))
    scores = random_scores(problem, seed=2)
    samples = 4
    e = F.soft_erasure(problem, scores, samples)
    ns, nc = F.soft_sufficiency_from(e, 1e-6), F.soft_comprehensiveness_from(e, 1e-6)
    for b in range(problem.n_rows):
        E, w = feats_of(problem, b)
        s = scores[b][problem.feature_mask[b]].double().numpy()
        q = (s - s.min()) / (s.max() - s.min())
        kept, removed = [], []
        for k in range(samples):
            u = F.soft_uniforms(problem, b, k).double().numpy()  # [n, D]
            kept.append(f_numpy(np.where(u < q[:, None], E, 0.0), w))
            removed.append(f_numpy(np.where(u < 1 - q[:, None], E, 0.0), w))
        p, p0 = f_numpy(E, w), f_numpy(0 * E, w)
        if p - p0 <= 1e-6:
            assert math.isnan(ns[b]) and math.isnan(nc[b])
            continue
        ref_ns, ref_nc = _soft_numpy(p, p0, kept, removed)
        assert ns[b].item() == pytest.approx(ref_ns, rel=1e-9, abs=1e-12)
        assert nc[b].item() == pytest.approx(ref_nc, rel=1e-9, abs=1e-12)
    # The draws belong to the row, not to the batch it is computed in.
    sub = problem.select(torch.tensor([2, 0]))
    e_sub = F.soft_erasure(sub, scores[[2, 0]], samples)
    torch.testing.assert_close(e_sub.kept, e.kept[[2, 0]])
    # Keep probability 1 everywhere is the prompt itself; 0 is the baseline.
    rows = torch.arange(problem.n_rows)
    ones = torch.ones(problem.n_rows, 7)
    fx, fb = F.endpoints(problem)
    uni = lambda i: F.soft_uniforms(problem, i, 0)  # noqa: E731
    torch.testing.assert_close(problem.evaluate_soft(rows, ones, uni).double(), fx)
    torch.testing.assert_close(problem.evaluate_soft(rows, 0 * ones, uni).double(), fb)


@torch.no_grad()
def test_soft_metrics_on_a_real_model_use_the_answer_probability():
    """On a padded batch of a real model: the same masks put on each unpadded prompt by hand,
    the answer's probability (exp of the summed log-probs) in the paper's formulas."""
    lm = tiny_lm("llama")
    prompts, answers = ["12+3=", "7x45=", "1/2="], ["1", "3", "0"]  # one token: p ~ 1/vocab
    problem, _ = model_problem(lm, prompts, answers)
    problem = dataclasses.replace(problem, log_prob_target=True, seeds=(3, 4, 5))
    scores = random_scores(problem, seed=6)
    samples = 3
    e = F.soft_erasure(problem, scores, samples)
    ns, nc = F.soft_sufficiency_from(e, 1e-6), F.soft_comprehensiveness_from(e, 1e-6)
    defined = 0
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids, n_prompt, cols = unpadded(lm, p, a)
        x, base = baseline_embeds(lm, ids, cols)
        s = scores[b][problem.feature_mask[b]].double()
        q = ((s - s.min()) / (s.max() - s.min()))[:, None]
        kept, removed = [], []
        for k in range(samples):
            u = F.soft_uniforms(problem, b, k).double()
            for keep_prob, out in ((q, kept), (1 - q, removed)):
                z = x.clone()
                z[0, cols] = torch.where(u < keep_prob, x[0, cols], base[0, cols])
                out.append(direct_log_prob(lm, z, ids, n_prompt).exp().item())
        px = direct_log_prob(lm, x, ids, n_prompt).exp().item()
        p0 = direct_log_prob(lm, base, ids, n_prompt).exp().item()
        assert e.p[b].item() == pytest.approx(px, rel=1e-4)
        if px - p0 <= 1e-6:
            assert math.isnan(ns[b])
            continue
        defined += 1
        ref_ns, ref_nc = _soft_numpy(px, p0, kept, removed)
        assert ns[b].item() == pytest.approx(ref_ns, rel=1e-3, abs=1e-6)
        assert nc[b].item() == pytest.approx(ref_nc, rel=1e-3, abs=1e-6)
    assert defined >= 1  # the formulas were checked, not only their undefined case


def test_soft_metrics_are_undefined_for_constant_scores_and_small_gaps():
    problem, _ = make_batch(lengths=(5, 3))
    flat = torch.where(problem.feature_mask, 1.0, 0.0)
    e = F.soft_erasure(problem, flat, 2)
    assert F.soft_sufficiency_from(e, 1e-6).isnan().all()
    assert F.soft_comprehensiveness_from(e, 1e-6).isnan().all()
    # Rows whose p - p0 is below min_gap are left out; the others keep their value.
    e = F.soft_erasure(problem, random_scores(problem, seed=4), 2)
    gap = e.p - e.p0
    cut = float(gap.max()) - 1e-9  # keeps only the row with the widest gap
    for fn in (F.soft_sufficiency_from, F.soft_comprehensiveness_from):
        wide, narrow = fn(e, 1e-6), fn(e, cut)
        keep = gap >= cut
        assert keep.sum() == 1 and narrow[~keep].isnan().all()
        torch.testing.assert_close(narrow[keep], wide[keep])


def test_soft_masks_are_shared_by_both_passes_even_without_seeds(monkeypatch):
    problem, _ = make_batch(lengths=(5, 3))
    unseeded = dataclasses.replace(problem, seeds=(None, None))
    seen = []
    original = AttributionProblem.evaluate_soft

    def recording(self, rows, keep_prob, uniforms):
        seen.append([uniforms(i).clone() for i in range(len(rows))])
        return original(self, rows, keep_prob, uniforms)

    monkeypatch.setattr(AttributionProblem, "evaluate_soft", recording)
    F.soft_erasure(unseeded, random_scores(problem, seed=4), 3)
    kept, removed = seen
    assert len(kept) == 6 and all(torch.equal(a, b) for a, b in zip(kept, removed, strict=True))
    assert not torch.equal(kept[0], kept[1])  # each mask its own draw


class _Linear:
    """A method whose scores are a fixed non-linear function of the embeddings, so that the
    sensitivity reference can recompute them with NumPy."""

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        s = (problem.embeds**2).sum(-1) - problem.embeds[..., 0]
        return MethodOutput(torch.where(problem.feature_mask, s, torch.zeros_like(s)).float())


def test_max_sensitivity_equals_the_definition():
    problem, _ = make_batch(lengths=(4, 6, 2))
    method = _Linear()
    scores = method.attribute(problem).scores
    samples, radius = 4, 0.05
    got = F.max_sensitivity(problem, scores, method, radius, samples)
    for b in range(problem.n_rows):
        g = torch.Generator().manual_seed(problem.seeds[b])
        m = problem.feature_mask[b]
        noise = torch.zeros(samples, *problem.embeds.shape[1:], dtype=torch.float64)
        noise[:, m] = (
            (torch.rand(samples, int(m.sum()), D, generator=g) * 2 - 1) * radius
        ).double()
        x = problem.embeds[b][None] + noise  # [samples, seq, d]
        s0 = ((problem.embeds[b] ** 2).sum(-1) - problem.embeds[b, :, 0]) * problem.feature_mask[b]
        s1 = ((x**2).sum(-1) - x[..., 0]) * problem.feature_mask[b]
        ref = ((s1 - s0).norm(dim=-1) / s0.norm()).max().item()
        assert got[b].item() == pytest.approx(ref, rel=1e-5)
    # A seeded random method gives the same scores whatever the input: sensitivity 0.
    rnd = RandomAttribution()
    assert F.max_sensitivity(problem, rnd.attribute(problem).scores, rnd).abs().max() == 0


def _random_ap_brute_force(y: np.ndarray) -> float:
    """The mean of scikit-learn's average precision over every order of the items."""
    n = len(y)
    aps = [
        sklearn.metrics.average_precision_score(y, -np.array(perm, dtype=float))
        for perm in itertools.permutations(range(n))
    ]
    return float(np.mean(aps))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_expected_average_precision_equals_brute_force(n):
    for n_pos in range(1, n):
        y = np.array([1] * n_pos + [0] * (n - n_pos))
        got = expected_average_precision(torch.tensor([n_pos]), torch.tensor([n]))
        assert got.item() == pytest.approx(_random_ap_brute_force(y))


def test_tie_averaged_precision_is_the_mean_over_tie_orders():
    """Blocks of ties: the mean of scikit-learn's AP over every order of the tied items;
    without ties, scikit-learn's AP itself."""
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        s = torch.randint(0, 3, (6,), generator=g).float()
        y = torch.randint(0, 2, (6,), generator=g)
        y[0], y[1] = 1, 0
        aps = []
        for perm in itertools.permutations(range(6)):
            order = sorted(range(6), key=lambda i: (-float(s[i]), perm[i]))
            ranked = np.zeros(6)
            ranked[order] = np.arange(6, 0, -1)
            aps.append(sklearn.metrics.average_precision_score(y.numpy(), ranked))
        got = tie_averaged_precision(s[None], y[None])
        assert got.item() == pytest.approx(float(np.mean(aps)))
    s = torch.randn(20, 9, generator=g)
    y = torch.randint(0, 2, (20, 9), generator=g)
    y[:, 0], y[:, 1] = 1, 0
    torch.testing.assert_close(tie_averaged_precision(s, y), average_precision(s, y))


def _precision_brute_force(y: np.ndarray, s: np.ndarray) -> float:
    """Normalised precision of the top P (P positives), ties at the cut broken every way."""
    n, p = len(y), int(y.sum())
    hits = []
    for perm in itertools.permutations(range(n)):  # a tie-break order
        order = sorted(range(n), key=lambda j: (-s[j], perm[j]))
        hits.append(y[order[:p]].sum() / p)
    base = p / n
    return (float(np.mean(hits)) - base) / (1 - base)


def test_plausibility_precision_equals_brute_force():
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        n = 6
        y = torch.randint(0, 2, (n,), generator=g)
        y[0], y[1] = 1, 0
        s = torch.randint(-2, 3, (n,), generator=g).float()  # ties on purpose
        got = F.plausibility_precision(s[None], y[None])
        assert got.item() == pytest.approx(_precision_brute_force(y.numpy(), s.abs().numpy()))


def test_plausibility_of_random_scores_is_zero_and_of_the_truth_one():
    g = torch.Generator().manual_seed(11)
    rows, n = 1500, 13
    labels = (torch.rand(rows, n, generator=g) < 0.8).long()
    labels[:, 0], labels[:, 1] = 1, 0  # both classes on every row
    labels[:, 2] = -1  # an ignored token
    noise = torch.randn(rows, n, generator=g)
    for fn in (F.plausibility_auprc, F.plausibility_precision):
        assert fn(labels.float(), labels).tolist() == [1.0] * rows  # the indicator itself
        assert abs(fn(noise, labels).mean().item()) < 0.03  # random: 0 in expectation
        # Constant scores carry no ranking: exactly chance, whichever normalisation.
        assert fn(torch.ones(rows, n), labels).abs().max().item() < 1e-12
        assert fn(-labels.float() + 5, labels).max().item() < 0  # the wrong tokens on top


def test_shapley_plausibility_and_randomization_equal_references():
    g = torch.Generator().manual_seed(9)
    mask = torch.arange(7)[None] < torch.tensor([7, 4, 2, 5])[:, None]
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    err = F.shapley_error(s, t, mask)
    rho = F.randomization_spearman(s, t, mask)
    labels = torch.where(mask, torch.randint(0, 2, (4, 7), generator=g), -1)
    labels[2] = torch.tensor([1, 1, -1, -1, -1, -1, -1])  # no negative: undefined
    ap = F.plausibility_auprc(s, labels)
    assert math.isnan(ap[2])
    for r in range(4):
        m = mask[r]
        a, e = s[r][m].numpy(), t[r][m].numpy()
        assert err[r].item() == pytest.approx(np.linalg.norm(a - e) / np.linalg.norm(e))
        assert rho[r].item() == pytest.approx(scipy.stats.spearmanr(a, e).statistic)
        if r != 2:
            y = labels[r][labels[r] >= 0].numpy()
            sc = s[r][labels[r] >= 0].abs().numpy()
            # E[AP] of a random ranking: checked against brute force in its own test.
            expected = expected_average_precision(
                torch.tensor([int(y.sum())]), torch.tensor([len(y)])
            ).item()
            ref = (sklearn.metrics.average_precision_score(y, sc) - expected) / (1 - expected)
            assert ap[r].item() == pytest.approx(ref)
    nan_row = torch.full((1, 7), math.nan)
    assert F.shapley_error(s[:1], nan_row, mask[:1]).isnan().all()


# --------------------------------------------------------------------------- class == functional


def _class_cases(problem, scores, scores2, labels):
    mask = problem.feature_mask
    method = _Linear()
    # One inputs object for every metric: the contract of update().
    inputs = MetricInputs(
        problem, scores, method=method, labels=labels, exact_shapley=scores2, random_scores=scores2
    )
    return {
        "comprehensiveness": (lambda: Comprehensiveness(), inputs,
                              lambda: F.comprehensiveness(problem, scores)),
        "sufficiency": (lambda: Sufficiency(), inputs,
                        lambda: F.sufficiency(problem, scores)),
        "deletion_auc": (lambda: DeletionAUC(), inputs,
                         lambda: F.deletion_auc(problem, scores)),
        "insertion_auc": (lambda: InsertionAUC(), inputs,
                          lambda: F.insertion_auc(problem, scores)),
        "loo_kendall_tau": (lambda: LooKendallTau(), inputs,
                            lambda: F.loo_kendall_tau(problem, scores)),
        "deletion_auc_normalised": (lambda: DeletionAUCNormalised(0.5), inputs,
            lambda: F.deletion_auc_normalised_from_curves(F.erasure_curves(problem, scores), 0.5)),
        "insertion_auc_normalised": (lambda: InsertionAUCNormalised(0.5), inputs,
            lambda: F.insertion_auc_normalised_from_curves(F.erasure_curves(problem, scores), 0.5)),
        "soft_sufficiency": (lambda: SoftSufficiency(3), inputs,
            lambda: F.soft_sufficiency_from(F.soft_erasure(problem, scores, 3))),
        "soft_comprehensiveness": (lambda: SoftComprehensiveness(3), inputs,
            lambda: F.soft_comprehensiveness_from(F.soft_erasure(problem, scores, 3))),
        "infidelity": (lambda: Infidelity(4, "gaussian", noise_std=0.2), inputs,
                       lambda: F.infidelity(problem, scores, 4, "gaussian", noise_std=0.2).sqrt()),
        "max_sensitivity": (lambda: MaxSensitivity(0.05, 3), inputs,
                            lambda: F.max_sensitivity(problem, scores, method, 0.05, 3)),
        "completeness_error": (lambda: CompletenessError(), inputs,
                               lambda: F.completeness_error(problem, scores)),
        "shapley_error": (lambda: ShapleyError(), inputs,
                          lambda: F.shapley_error(scores, scores2, mask)),
        "plausibility_auprc": (lambda: PlausibilityAUPRC(), inputs,
                               lambda: F.plausibility_auprc(scores, labels)),
        "plausibility_precision": (lambda: PlausibilityPrecision(), inputs,
                                   lambda: F.plausibility_precision(scores, labels)),
        "randomization_spearman": (lambda: RandomizationSpearman(), inputs,
                                   lambda: F.randomization_spearman(scores, scores2, mask)),
        "plausibility_top1": (lambda: PlausibilityTop1(), inputs,
                              lambda: F.plausibility_top1(scores, labels)),
        "lds": (lambda: LDS(8, 0.3), inputs, lambda: F.lds(problem, scores, 8, 0.3)),
    }  # fmt: skip


def test_every_metric_class_equals_its_function():
    problem, _ = make_batch(lengths=(5, 3, 7, 1, 6))
    scores, scores2 = random_scores(problem, 1), random_scores(problem, 2)
    labels = torch.where(problem.feature_mask, torch.arange(scores.shape[1]) % 3 - 1, -1)
    cases = _class_cases(problem, scores, scores2, labels)
    assert set(cases) == set(METRICS)
    for name, (make, args, fn) in cases.items():
        metric = make()
        assert isinstance(metric, METRICS[name])
        assert isinstance(metric.higher_is_better, bool)
        metric.update(args)
        metric.update(args)  # twice: the mean over both equals the mean of one
        ref = fn()
        got = metric.compute()
        if isinstance(got, dict):
            per_k = ref.double().nanmean(0)
            for j, frac in enumerate(FRACTIONS):
                assert got[f"{frac * 100:g}%"].item() == pytest.approx(per_k[j].item())
            assert got["aopc"].item() == pytest.approx(ref.double().mean(-1).nanmean().item())
        else:
            assert got.item() == pytest.approx(ref.double().nanmean().item(), nan_ok=True), name
        assert metric.per_example().shape[0] == 2 * problem.n_rows
        metric.reset()
        assert metric.per_example().numel() == 0


def test_metric_parameters_are_checked():
    with pytest.raises(ValueError, match="fractions"):
        Comprehensiveness(fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="noise_std"):
        Infidelity(noise_std=0)
    with pytest.raises(ValueError, match="remove_prob"):
        Infidelity(remove_prob=1.0)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        Infidelity(perturbation="uniform")
    with pytest.raises(ValueError, match="min_gap"):
        DeletionAUCNormalised(min_gap=0)
    with pytest.raises(ValueError, match="n_samples"):
        SoftSufficiency(n_samples=0)
    with pytest.raises(ValueError, match="min_gap"):
        SoftComprehensiveness(min_gap=1.5)
    with pytest.raises(ValueError, match="perturb_radius"):
        MaxSensitivity(perturb_radius=-1)


# --------------------------------------------------------------------------- the one contract


def test_a_metric_missing_what_it_needs_says_which():
    problem, _ = make_batch(lengths=(4, 3))
    bare = MetricInputs(problem, random_scores(problem, 1))
    for cls in METRICS.values():
        for need in cls.needs:
            with pytest.raises(ValueError, match=f"needs {need!r}"):
                cls().update(bare)


def test_what_a_metric_applies_to_is_declared_on_its_class():
    assert {
        "completeness_error": frozenset({"integrated_gradients", "random"}),
        "shapley_error": frozenset({"kernel_shap", "shapley_sampling", "random"}),
    } == APPLIES_TO
    assert applies("shapley_error", "kernel_shap") and not applies("shapley_error", "occlusion")
    assert applies("deletion_auc", "anything")
    # The control gets a metric of a few methods only when one of them is in the run.
    assert applies("shapley_error", "random")
    assert not applies("shapley_error", "random", ["random", "occlusion"])
    assert applies("shapley_error", "random", ["random", "kernel_shap"])
    assert applies("deletion_auc", "random", ["random"])


def test_shared_quantities_are_computed_once_per_inputs():
    problem, _ = make_batch(lengths=(5, 3))
    calls = []
    forward = problem.forward

    def counting(x, rows, **kw):
        calls.append(x.shape[0])
        return forward(x, rows, **kw)

    problem = dataclasses.replace(problem, forward=counting)
    inputs = MetricInputs(problem, random_scores(problem, 1))
    Comprehensiveness().update(inputs)
    first = len(calls)
    assert first > 0 and not inputs.computed("loo")
    Sufficiency().update(inputs)
    DeletionAUC().update(inputs)
    assert len(calls) == first  # the curves were kept
    LooKendallTau().update(inputs)
    assert inputs.computed("loo")
    again = len(calls)
    assert torch.equal(inputs.leave_one_out(), F.leave_one_out(problem))
    assert len(calls) > again  # the functional form recomputes; the inputs did not


def test_exact_shapley_cache_computes_each_example_once_and_reuses_a_methods_values():
    problem, _ = make_batch(lengths=(5, 3, 20))
    cache = ExactShapleyCache(max_tokens=8)
    keys = ["a", "b", "c"]
    ref = cache.reference(keys, problem)
    assert ref[2].isnan().all()  # 20 tokens: too many to enumerate
    exact = ExactShapley(8).attribute(problem.select(torch.tensor([0, 1]))).scores
    assert torch.allclose(ref[:2], exact.float(), atol=1e-6)
    # Cached: a second call with the rows in another order runs nothing.
    rows = torch.tensor([1, 0])
    sub = dataclasses.replace(problem.select(rows), forward=_no_calls)
    assert torch.equal(cache.reference(["b", "a"], sub), ref[rows])
    # A method that gives exact values fills the cache with them.
    filled = ExactShapleyCache(max_tokens=8)
    filled.put(keys[:2], problem.feature_mask[:2], exact)
    assert torch.equal(filled.reference(keys[:2], sub.select(torch.tensor([1, 0]))), exact.float())


def _no_calls(*args, **kwargs):
    raise AssertionError("the model was called for values already cached")
