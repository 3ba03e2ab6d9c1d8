"""The metric checks (:mod:`tokattr.sanity`): separation from the ``random`` control with a
paired bootstrap, resolution, rank agreement, the flag in the summary table, the CSV."""

from __future__ import annotations

import math

import pytest
import torch
from test_metrics import make_batch, random_scores

from tokattr.methods import Occlusion
from tokattr.metrics import functional as F
from tokattr.sanity import (
    NOT_DISCRIMINATING,
    SANITY_COLUMNS,
    metric_checks,
    paired_interval,
    read_sanity_csv,
    separations,
    write_sanity_csv,
)
from tokattr.table import table_from_values


def _table(values, params=None):
    return table_from_values(values, params, n_bootstrap=500)


def test_a_metric_computed_on_random_scores_is_flagged():
    """Leave-one-out agreement of 60 rows: occlusion (tau = 1) is told from the control, a
    second draw of random scores is not, and the summary table says so."""
    problem, _ = make_batch(lengths=(6, 5, 7, 4, 6, 5) * 10)
    tau = {
        "occlusion": F.loo_kendall_tau(problem, Occlusion().attribute(problem).scores),
        "random": F.loo_kendall_tau(problem, random_scores(problem, seed=1)),
        "shuffled": F.loo_kendall_tau(problem, random_scores(problem, seed=2)),
    }
    table = _table({(m, "loo_kendall_tau"): v for m, v in tau.items()})
    by_method = {s.method: s for s in table.sanity}
    assert by_method["occlusion"].discriminates and by_method["occlusion"].effect > 0.5
    assert not by_method["shuffled"].discriminates
    assert by_method["shuffled"].ci_low < 0 < by_method["shuffled"].ci_high
    (check,) = table.checks
    assert (check.methods, check.discriminated, check.flagged) == (2, 1, False)

    flat = _table({(m, "loo_kendall_tau"): tau[m] for m in ("random", "shuffled")})
    (check,) = flat.checks
    assert check.flagged
    md = flat.to_markdown()
    assert "loo_kendall_tau ↑ ⚠" in md and NOT_DISCRIMINATING in md
    assert "| *told from random* | 0/1 |" in md
    assert "⚠" not in table.to_markdown()


def test_the_interval_is_paired_over_examples():
    """Values that vary a lot across examples but differ by a constant: the paired interval
    is a point, where unpaired intervals of the two means would overlap."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g, dtype=torch.float64) * 10
    table = _table({("random", "lds"): base, ("m", "lds"): base + 0.5})
    (sep,) = table.sanity
    assert sep.effect == pytest.approx(0.5)
    assert sep.ci_low == pytest.approx(0.5) and sep.ci_high == pytest.approx(0.5)
    assert sep.discriminates
    m, r = table.get("m", "lds"), table.get("random", "lds")
    assert m.ci_low < r.ci_high  # the unpaired intervals overlap


def test_direction_nan_pairs_and_per_k_metrics():
    nan = math.nan
    # Lower is better for deletion_auc: a lower value is a positive effect.
    v = torch.tensor([1.0, 2.0, nan, 3.0, 4.0], dtype=torch.float64)
    table = _table({("random", "deletion_auc"): v, ("m", "deletion_auc"): v - 1})
    (sep,) = table.sanity
    assert sep.effect == pytest.approx(1.0)
    # A pair with a NaN on either side is dropped, not counted as 0.
    mean, low, high = paired_interval(torch.tensor([1.0, nan, 3.0], dtype=torch.float64))
    assert mean == 2.0 and 1.0 <= low <= high <= 3.0
    assert all(math.isnan(x) for x in paired_interval(torch.tensor([nan])))
    # The ERASER metrics are checked on their AOPC (the mean over k).
    per_k = torch.arange(20, dtype=torch.float64).view(4, 5)
    table = _table({("random", "comprehensiveness"): per_k, ("m", "comprehensiveness"): per_k + 2})
    (sep,) = table.sanity
    assert sep.metric == "comprehensiveness" and sep.effect == pytest.approx(2.0)
    # Without the control there is nothing to check.
    assert _table({("m", "lds"): v}).sanity == []
    assert _table({("m", "lds"): v}).checks == []
    with pytest.raises(ValueError, match="same examples"):
        separations({("random", "lds", ""): v, ("m", "lds", ""): v[:3]}, {"lds": True})


def test_resolution_and_rank_agreement_equal_hand_computed():
    """Three methods, three metrics: resolution = median interval width / spread of the
    means; rank agreement = mean Kendall tau with the other metrics' rankings."""
    n = 40
    ones = torch.ones(n, dtype=torch.float64)
    alt = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    values = {
        # lds (higher better): a > b > random, each with spread from alt.
        ("random", "lds"): 0 * ones + alt,
        ("a", "lds"): 2 * ones + alt,
        ("b", "lds"): 1 * ones + alt,
        # deletion_auc (lower better): the same order as lds.
        ("random", "deletion_auc"): 3 * ones,
        ("a", "deletion_auc"): 1 * ones,
        ("b", "deletion_auc"): 2 * ones,
        # insertion_auc (higher better): the reverse order.
        ("random", "insertion_auc"): 3 * ones,
        ("a", "insertion_auc"): 1 * ones,
        ("b", "insertion_auc"): 2 * ones,
    }
    table = _table(values)
    checks = {c.metric: c for c in metric_checks(table.rows, table.sanity)}
    lds_rows = [table.get(m, "lds") for m in ("random", "a", "b")]
    widths = sorted(r.ci_high - r.ci_low for r in lds_rows)
    assert checks["lds"].resolution == pytest.approx(widths[1] / 2.0)
    assert checks["deletion_auc"].resolution == 0.0  # constant values: zero-width intervals
    assert checks["lds"].rank_agreement == pytest.approx((1 + -1) / 2)
    assert checks["insertion_auc"].rank_agreement == pytest.approx(-1.0)
    assert checks["insertion_auc"].discriminated == 2  # told apart, in the wrong direction
    assert {s.method: s.effect for s in table.sanity if s.metric == "insertion_auc"} == {
        "a": pytest.approx(-2.0),
        "b": pytest.approx(-1.0),
    }


def test_csv_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(30, generator=g, dtype=torch.float64)
    table = _table({("random", "lds"): v, ("m", "lds"): v + 1, ("k", "lds"): v.flip(0)})
    path = write_sanity_csv(tmp_path / "metric_sanity.csv", table.sanity)
    assert path.read_text().splitlines()[0] == ",".join(SANITY_COLUMNS)
    assert read_sanity_csv(path) == table.sanity
    (tmp_path / "bad.csv").write_text("metric,method\nlds,m\n")
    with pytest.raises(ValueError, match="columns"):
        read_sanity_csv(tmp_path / "bad.csv")


def test_verdicts_for_a_missing_constant_or_thin_control():
    nan = math.nan
    g = torch.Generator().manual_seed(5)
    v = torch.randn(40, generator=g, dtype=torch.float64)
    values = {
        # shapley_error where no prompt was short enough: random has no value at all.
        ("random", "shapley_error"): torch.full((40,), nan, dtype=torch.float64),
        ("kernel_shap", "shapley_error"): torch.full((40,), nan, dtype=torch.float64),
        # max_sensitivity: random's is 0 on every example by construction.
        ("random", "max_sensitivity"): torch.zeros(40, dtype=torch.float64),
        ("occlusion", "max_sensitivity"): v.abs(),
        # Only 5 examples defined: a huge effect, but too few pairs to declare it.
        ("random", "lds"): torch.cat([v[:5], torch.full((35,), nan, dtype=torch.float64)]),
        ("occlusion", "lds"): torch.cat([v[:5] + 9, torch.full((35,), nan, dtype=torch.float64)]),
    }
    table = _table(values)
    checks = {c.metric: c for c in table.checks}
    assert checks["shapley_error"].verdict.startswith("random has too few values")
    assert checks["max_sensitivity"].verdict == "random is constant by construction"
    assert checks["max_sensitivity"].discriminated == 1  # told apart, trivially: said so
    assert checks["lds"].verdict.startswith("random has too few values")
    assert not any(c.flagged for c in checks.values())
    assert not next(s for s in table.sanity if s.metric == "lds").discriminates
    assert "⚠" not in table.to_markdown()
    # No method but the control: nothing to check, nothing flagged.
    lone = _table({("random", "lds"): v})
    assert lone.sanity == [] and lone.checks == [] and "⚠" not in lone.to_markdown()
