"""``tokattr.evaluate``: the method x metric table, its known answers on the bundled model,
and its refusals."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from _tiny import tiny_lm

import tokattr
from tokattr import evaluation
from tokattr.batching import collate, encode_example
from tokattr.data.arithmetic import ArithmeticGenerator
from tokattr.metrics import METRICS, MetricInputs, PerExampleMetric
from tokattr.metrics import functional as F
from tokattr.problems import batch_problem
from tokattr.table import bootstrap_interval


@pytest.fixture(scope="module")
def arith():
    return tokattr.load_model("arith-tiny")


@pytest.fixture(scope="module")
def known_answers(arith):
    """60 fresh problems (a seed never used in training), answers from the generator."""
    gen = ArithmeticGenerator(seed=4242)
    problems = [gen.problem(i) for i in range(60)]
    return tokattr.evaluate(
        arith,
        [p.prompt for p in problems],
        [p.answer for p in problems],
        methods=["integrated_gradients", "occlusion", "random"],
        metrics=["comprehensiveness", "sufficiency", "loo_kendall_tau", "randomization_spearman"],
        progress=False,
    )


def test_occlusion_agrees_exactly_with_leave_one_out(known_answers):
    values = known_answers.values[("occlusion", "loo_kendall_tau", "")]
    assert values.shape == (60,)
    # Every prompt of 2+ tokens: exactly 1 (same baseline, same removals).
    assert (values[~values.isnan()] == 1.0).all()
    assert known_answers.get("occlusion", "loo_kendall_tau").n >= 59


def test_methods_beat_random_on_erasure(known_answers):
    t = known_answers
    for method in ("occlusion", "integrated_gradients"):
        assert t.get(method, "comprehensiveness").mean > t.get("random", "comprehensiveness").mean
    assert t.get("occlusion", "sufficiency").mean < t.get("random", "sufficiency").mean


def test_reinitialising_the_model_changes_the_scores(known_answers):
    t = known_answers
    for method in ("occlusion", "integrated_gradients"):
        assert t.get(method, "randomization_spearman").mean < 0.5
    # The seeded random method ignores the model: it fails the check with rho = 1.
    assert t.get("random", "randomization_spearman").mean == pytest.approx(1.0)


def test_every_metric_states_its_direction(known_answers, tmp_path):
    md = known_answers.to_markdown()
    head = md.splitlines()[0]
    for name in ("comprehensiveness", "sufficiency", "loo_kendall_tau", "randomization_spearman"):
        arrow = "↑" if METRICS[name].higher_is_better else "↓"
        assert f"{name} {arrow}" in head
    assert "higher is better" in md and "lower is better" in md
    path = known_answers.to_csv(tmp_path / "metrics.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "method",
        "metric",
        "k",
        "mean",
        "ci_low",
        "ci_high",
        "higher_is_better",
        "n",
    ]
    # 3 methods x (comprehensiveness and sufficiency at 5 k + AOPC, and two scalar metrics)
    assert len(rows) == 3 * (2 * 6 + 2)
    for r in rows:
        assert r["higher_is_better"] == str(METRICS[r["metric"]].higher_is_better)
        if r["n"] != "0":
            assert float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])


# --------------------------------------------------------------------------- the table's plumbing


PROMPTS = ["12+3=", "$12/-0.5=", "7 x 8 = ", "9-4="]
ANSWERS = ["15", "-24", "56", "5"]


def test_evaluate_values_equal_the_metric_functions():
    lm = tiny_lm("llama")
    table = tokattr.evaluate(
        lm,
        PROMPTS,
        ANSWERS,
        methods={"occlusion": {}, "kernel_shap": {"n_samples": 32}},
        metrics=["comprehensiveness", "deletion_auc", "shapley_error", "plausibility_auprc"],
        batch_size=3,  # two batches of examples
        progress=False,
    )
    # Recompute comprehensiveness and deletion AUC for occlusion by hand, batch by batch.
    attrs = table.attributions["occlusion"]
    assert [a.prompt for a in attrs] == PROMPTS
    comp, dele = [], []
    for chunk in (slice(0, 3), slice(3, 4)):
        enc = [
            encode_example(lm.tokenizer, p, a)
            for p, a in zip(PROMPTS[chunk], ANSWERS[chunk], strict=True)
        ]
        batch = collate(lm.tokenizer, enc)
        problem = batch_problem(lm, batch)
        scores = torch.zeros(batch.feature_mask.shape)
        for b, a in enumerate(attrs[chunk]):
            scores[b, batch.feature_mask[b]] = a.scores
        comp.append(F.comprehensiveness(problem, scores))
        dele.append(F.deletion_auc(problem, scores))
    comp_t, dele_t = torch.cat(comp), torch.cat(dele)
    # (Forward passes of other sizes than evaluate's: float32 rounding differs a little.)
    close = dict(rtol=1e-5, atol=1e-5)
    got = table.values
    torch.testing.assert_close(got[("occlusion", "comprehensiveness", "5%")], comp_t[:, 1], **close)
    torch.testing.assert_close(
        got[("occlusion", "comprehensiveness", "aopc")], comp_t.mean(-1), **close
    )
    torch.testing.assert_close(got[("occlusion", "deletion_auc", "")], dele_t, **close)
    # shapley_error applies to SHAP estimators only; plausibility needs formatting tokens
    # ($ in the second prompt, spaces in the third).
    assert ("occlusion", "shapley_error", "") not in table.values
    err = table.values[("kernel_shap", "shapley_error", "")]
    assert err.shape == (4,) and not err.isnan().any() and (err > 0).all()
    plaus = table.values[("occlusion", "plausibility_auprc", "")]
    assert plaus.isnan().tolist() == [True, False, False, True]
    row = table.get("occlusion", "plausibility_auprc")
    assert row.n == 2 and row.mean == pytest.approx(float(plaus[1:3].mean()))


def test_completeness_error_is_for_integrated_gradients_only():
    lm = tiny_lm("llama")
    table = tokattr.evaluate(
        lm,
        PROMPTS[:2],
        ANSWERS[:2],
        methods={"integrated_gradients": {"n_steps": 256}, "saliency": {}},
        metrics=["completeness_error", "infidelity", "max_sensitivity"],
        progress=False,
    )
    assert {(r.method, r.metric) for r in table.rows} == {
        ("integrated_gradients", "completeness_error"),
        ("integrated_gradients", "infidelity"),
        ("integrated_gradients", "max_sensitivity"),
        ("saliency", "infidelity"),
        ("saliency", "max_sensitivity"),
    }
    assert table.get("integrated_gradients", "completeness_error").mean < 1e-2
    assert "—" not in table.to_markdown().splitlines()[2]  # IG's row has every cell


def test_bootstrap_interval():
    v = torch.tensor([1.0, 2.0, 3.0, math.nan, 4.0])
    mean, low, high, n = bootstrap_interval(v, 2000)
    assert (mean, n) == (2.5, 4)
    assert 1.0 <= low < mean < high <= 4.0
    assert bootstrap_interval(v, 2000) == (mean, low, high, n)  # seeded
    assert math.isnan(bootstrap_interval(torch.tensor([math.nan]))[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(metrics=["comprehensivenes"]), "unknown metric"),
        (dict(methods=["integrated_gradient"]), "unknown method"),
        (dict(methods={"occlusion": {"n_steps": 3}}), "unknown parameter"),
        (dict(metric_params={"infidelity": {"noise_std": -1.0}}), "noise_std"),
        (dict(metric_params={"infidelity": {"n_samples": 3}}), r"unknown parameter.*n_samples"),
        (dict(metrics=["sufficiency"], metric_params={"infidelity": {}}), "not computed"),
        (dict(baseline="mean"), "unknown baseline"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=["12+3=", ""]), "empty prompt"),
        (dict(prompts=["1+" * 200 + "1="], answers=["201"]), "leaves no room for an answer"),
        (dict(answers=["15"]), "1 answers for 2 prompts"),
    ],
)
def test_bad_input_fails_before_any_work(monkeypatch, arith, kwargs, message):
    def no_work(*args, **kw):
        raise AssertionError("attribution ran before the input was checked")

    monkeypatch.setattr(evaluation, "attribute_collated", no_work)
    args = dict(prompts=["12+3=", "9-4="], answers=["15", "5"], progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        tokattr.evaluate(arith, **args)


class _TopShare(PerExampleMetric):
    """A metric defined outside tokattr: the share of |score| on the top token, over the
    problem's features, and (to need something) the leave-one-out drops' sum."""

    higher_is_better = True
    name = "top_share"
    needs = frozenset({"method"})
    applies_to = frozenset({"occlusion"})

    def per_batch(self, inputs: MetricInputs) -> torch.Tensor:
        assert inputs.need("method", self.name) is not None
        s = inputs.scores.abs().double().cpu()
        return s.max(-1).values / s.sum(-1)


def test_a_new_metric_is_one_class_and_one_registry_line(monkeypatch, arith):
    """What docs/ARCHITECTURE.md promises: nothing in evaluation knows the metric's name."""
    monkeypatch.setitem(METRICS, "top_share", _TopShare)
    prompts = ["12+3=", "9-4=", "$1,000+2="]
    table = tokattr.evaluate(
        arith, prompts, methods=["occlusion", "random"], metrics=["top_share"], progress=False
    )
    occ = tokattr.attribute(arith, prompts, "occlusion")
    want = torch.tensor([float(a.scores.abs().max() / a.scores.abs().sum()) for a in occ])
    torch.testing.assert_close(table.values[("occlusion", "top_share", "")].float(), want)
    assert ("random", "top_share", "") not in table.values  # applies_to is honoured
    assert table.get("occlusion", "top_share").higher_is_better
