"""Coalition methods sharing prefixes (``tokattr.engine.coalitions``): the same scores as full
passes, from fewer columns; the plan against brute force; the pass split against every split."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm

from tokattr.attribution import attribute
from tokattr.engine import coalitions
from tokattr.methods.exact_shapley import _without_last

PROMPTS = ["123+4567=", "7x5=", "12,345-678=", "9="]
ANSWERS = ["4690", "35", "11667", "9"]
SETTINGS = {
    "kernel_shap": {"n_samples": 48},
    "shapley_sampling": {"n_samples": 3},
    "exact_shapley": {},
    "lime": {"n_samples": 32},
    "context_cite": {"n_ablations": 24},
}


@pytest.fixture
def always_share(monkeypatch):
    """Share prefixes wherever the columns allow it, whatever the passes cost."""
    monkeypatch.setattr(coalitions, "pass_overhead_tokens", lambda problem, seconds=None: 8.0)
    monkeypatch.setattr(coalitions, "MIN_SAVING", -1.0)


def _record_passes(lm):
    """Hooks recording (sequences, new columns, cached columns) of each forward of ``lm``."""
    passes = []

    def pre(_, args, kwargs):
        x = kwargs["inputs_embeds"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = 0 if cache is None else cache.get_seq_length()
        passes.append((x.shape[0], x.shape[1], cached))

    return passes, lm.model.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("method", sorted(SETTINGS))
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_prefixes_give_the_scores_of_full_passes(arch, method, always_share):
    """Every coalition method, on every architecture, left- and right-padded rows in one batch:
    the scores and evaluations of full passes, from passes that start after column 0 and
    compute fewer columns."""
    lm = tiny_lm(arch)
    prompts, answers = (PROMPTS[1:], ANSWERS[1:]) if method == "exact_shapley" else (
        PROMPTS, ANSWERS
    )  # fmt: skip
    kw = {"target": answers, "seed": 5, "batch_size": 8, **SETTINGS[method]}
    full = attribute(lm, prompts, method, prefix_reuse=False, **kw)
    passes, hook = _record_passes(lm)
    try:
        shared = attribute(lm, prompts, method, **kw)
    finally:
        hook.remove()
    for a, b in zip(shared, full, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=2e-5, rtol=1e-4)
        assert a.target_score == pytest.approx(b.target_score, abs=1e-5)
    evals = [r.model_evals for r in shared]
    if method in ("kernel_shap", "shapley_sampling", "exact_shapley"):
        assert evals == [r.model_evals for r in full]  # every end is a coalition already
    assert any(cached > 0 for _, _, cached in passes)
    computed = sum(n * cols for n, cols, _ in passes)
    whole = sum(n * (cols + cached) for n, cols, cached in passes)
    assert computed < 0.9 * whole


def test_exact_shapley_costs_about_a_trie(always_share):
    """Exact Shapley values re-run each coalition from its last kept feature: the 2^n
    coalitions of a prompt of n features compute about 2^(n+1) feature columns, not n 2^n."""
    lm = tiny_lm("llama")
    passes, hook = _record_passes(lm)
    try:
        res = attribute(lm, "12345678+9=", "exact_shapley", target="12345687")
    finally:
        hook.remove()
    n = len(res.tokens)  # every prompt token is a feature
    assert res.model_evals == 2**n
    computed = sum(b * cols for b, cols, _ in passes)
    after = len(res.answer_tokens) + 1  # columns after the last feature, answer included
    # Beyond the columns after the features, about two columns a coalition (a trie's nodes),
    # with the slack of passes that start at their first sequence's column.
    assert computed - (2**n) * after < 3 * 2**n
    assert computed < 0.5 * (2**n) * (n + after)


def test_states_over_the_budget_fall_back_to_a_trunk(monkeypatch, always_share):
    """With no room for the parents' states, coalitions start from the row or the empty row:
    the same scores."""
    monkeypatch.setattr("tokattr.engine.memory.STATES_BUDGET", 0)
    lm = tiny_lm("llama")
    kw = {"target": ANSWERS[:3], "seed": 2}
    full = attribute(lm, PROMPTS[:3], "shapley_sampling", n_samples=2, prefix_reuse=False, **kw)
    tight = attribute(lm, PROMPTS[:3], "shapley_sampling", n_samples=2, **kw)
    for a, b in zip(tight, full, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=2e-5, rtol=1e-4)


def test_grouped_features_share_prefixes(always_share):
    """Features of several tokens (words): the same scores as full passes."""
    lm = tiny_lm("qwen2")
    prompt, answer = "12 + 345 = 9 - 3 =", "6"
    kw = {"target": answer, "features": "separator: ", "seed": 1}
    for method in ("exact_shapley", "kernel_shap"):
        a = attribute(lm, prompt, method, **kw)
        b = attribute(lm, prompt, method, prefix_reuse=False, **kw)
        torch.testing.assert_close(a.scores, b.scores, atol=2e-5, rtol=1e-4)


def test_sharing_that_does_not_pay_runs_full_passes():
    """Where the estimated cost (columns plus a fixed cost a pass) is not low enough, the
    coalitions go through full passes: no pass reads a cache."""
    lm = tiny_lm("llama")
    passes, hook = _record_passes(lm)
    try:
        attribute(lm, PROMPTS, "context_cite", target=ANSWERS, n_ablations=24, seed=3)
    finally:
        hook.remove()
    assert passes and all(cached == 0 for _, _, cached in passes)


def test_plan_against_brute_force():
    """Each coalition's parent agrees with it on every column before its start and differs at
    the start; no candidate (the two trunks, the named parent) agrees longer; a wave comes
    after its parent's."""

    problem = _problem()
    gen = torch.Generator().manual_seed(0)
    m_per_row = 12
    rows = torch.arange(problem.n_rows).repeat_interleave(m_per_row)
    keep = torch.rand(len(rows), int(problem.n_features.max()), generator=gen) < 0.5
    keep[::5] = True  # some whole rows, which are trunks
    slots = torch.arange(keep.shape[1])[None]
    keep |= slots >= problem.n_features[rows, None]  # as evaluate does: no slot past a row's
    distinct, _ = torch.unique(torch.cat([rows[:, None], keep.long()], 1), dim=0,
                                     return_inverse=True)  # fmt: skip
    rows, keep = distinct[:, 0], distinct[:, 1:].bool()
    col_keep = problem.keep_columns(rows, keep)
    named = torch.full((len(rows),), -1)
    for i in range(1, len(rows)):
        if rows[i] == rows[i - 1] and i % 3:
            named[i] = i - 1
    entry_rows, parent, start, wave, source = coalitions.plan(problem, rows, col_keep, named)
    m, seq = col_keep.shape
    u = (len(entry_rows) - m) // 2
    x = torch.cat([col_keep, torch.ones(u, seq, dtype=torch.bool)])
    x = torch.cat([x, ~problem.feature_mask[entry_rows[m + u :]]])
    x = x | ~problem.feature_mask[entry_rows]  # off the features every sequence is the row
    for i in range(m):
        row = entry_rows[i]
        full_i = m + int((entry_rows[m : m + u] == row).nonzero())
        candidates = [full_i, full_i + u] + ([int(named[i])] if named[i] >= 0 else [])

        def agree(j, i=i):
            diff = (x[i] != x[j]).nonzero()
            return int(diff[0]) if len(diff) else seq

        if agree(full_i) == seq or agree(full_i + u) == seq:  # the coalition is a trunk
            assert parent[i] == -1 and wave[i] == -1
            assert source[i] == (full_i if agree(full_i) == seq else full_i + u)
            assert wave[source[i]] == 0  # the trunk is computed
            continue
        assert source[i] == i
        p = int(parent[i])
        assert torch.equal(x[i, : start[i]], x[p, : start[i]]) and x[i, start[i]] != x[p, start[i]]
        assert int(start[i]) == max(agree(j) for j in candidates)
        assert wave[i] == wave[p] + 1 and wave[p] >= 0


def _problem():
    """A problem of four rows of unlike lengths on the tiny Llama (from ``tokattr.attribute``'s
    own construction, captured)."""
    import tokattr.methods.kernel_shap as ks

    lm = tiny_lm("llama")
    seen = []
    real = ks.KernelShap.attribute

    def capture(self, problem):
        seen.append(problem)
        return real(self, problem)

    ks.KernelShap.attribute = capture
    try:
        attribute(lm, PROMPTS, "kernel_shap", target=ANSWERS, n_samples=4, prefix_reuse=False)
    finally:
        ks.KernelShap.attribute = real
    return seen[0]


def test_group_passes_is_the_cheapest_split():
    """The split of sorted sequences into passes: the least cost over every split (brute force
    over all cut sets) within the token and sequence limits."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        need = sorted((rng.randint(1, 40) for _ in range(n)), reverse=True)
        max_tokens, overhead = rng.choice([40, 64, 200]), rng.choice([0.0, 10.0, 100.0])
        max_rows = rng.choice([None, 1, 2, 3])
        groups, cost = coalitions.group_passes(need, max_tokens, overhead, max_rows)
        assert groups[0][0] == 0 and groups[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))

        def cost_of(cuts, n=n, need=need, max_tokens=max_tokens, overhead=overhead, rows=max_rows):
            bounds = [0, *cuts, n]
            total = 0.0
            for a, b in itertools.pairwise(bounds):
                if b - a > 1 and ((b - a) * need[a] > max_tokens or (rows and b - a > rows)):
                    return float("inf")
                total += overhead + (b - a) * need[a]
            return total

        best = min(cost_of(c) for k in range(n) for c in itertools.combinations(range(1, n), k))
        assert cost == pytest.approx(best)
        assert cost_of([a for a, _ in groups[1:]]) == pytest.approx(best)


def test_parent_orders():
    """Exact Shapley: each coalition's parent is it without its highest member. Shapley
    sampling: each step's parent an earlier step (0 the empty coalition), the step before
    within a block, so that blocks of ``block`` steps chain."""
    for n in (1, 3, 6):
        for c, p in enumerate(_without_last(n).tolist()):
            if c == 0:
                assert p == -1
            else:
                assert p == c & ~(1 << (c.bit_length() - 1))
    for n, block in ((10, 3), (8, 1), (5, 5), (7, 2)):
        up = coalitions.chain_parents(n, block).tolist()
        for k, p in enumerate(up, start=1):
            assert 0 <= p < k
            if (k - 1) % block:
                assert p == k - 1
        depth = [0] * (n + 1)
        for k, p in enumerate(up, start=1):
            depth[k] = depth[p] + 1
        assert max(depth) <= block + n.bit_length()


def test_erasure_curves_share_prefixes(always_share, monkeypatch):
    """Deletion and insertion curves, each point an earlier point's parent: the curves of full
    passes, computed from key/value states."""
    from tokattr.metrics.functional import erasure_curves

    problem = _problem()
    scores = torch.randn(problem.feature_mask.shape, generator=torch.Generator().manual_seed(1))
    ran = []
    real = coalitions.evaluate_sharing_prefixes

    def sharing(*args):
        out = real(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(coalitions, "evaluate_sharing_prefixes", sharing)
    shared = erasure_curves(problem, scores)
    assert ran == [True]
    monkeypatch.setattr(coalitions, "evaluate_sharing_prefixes", lambda *args: None)
    full = erasure_curves(problem, scores)
    torch.testing.assert_close(shared.deletion, full.deletion, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(
        shared.insertion, full.insertion, atol=1e-5, rtol=1e-5, equal_nan=True
    )
