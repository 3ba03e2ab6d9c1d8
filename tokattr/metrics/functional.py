"""Faithfulness metrics as pure functions: one value per example (NaN where undefined).

Every function that re-evaluates the model takes the :class:`AttributionProblem` of the
batch (target function, input embeddings, baselines, feature mask), so a token is removed
exactly as the methods remove it: its embedding replaced by the baseline, its position kept.
Scores are ``[batch, seq]`` (0 off the features), as methods return them.

References:
    DeYoung et al., "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL 2020.
    Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models", BMVC 2018 (deletion / insertion).
    Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.
    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023, and Cohen-Wang et
    al., "ContextCite: Attributing Model Generation to Context", NeurIPS 2024 (the linear
    datamodeling score).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import captum.metrics
import torch
from torch import Tensor

from tokattr.engine import coalitions, loo
from tokattr.methods.problem import AttributionProblem, Method
from tokattr.metrics.ranking import (
    FRACTIONS,
    GAP_EPS,
    attribution_ranks,
    kendall_tau,
    normalised_auc,
    normalised_average_precision,
    normalised_curve,
    normalised_precision_at_positives,
    spearman,
    top_k_sizes,
)


def feature_values(problem: AttributionProblem, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Scores per feature slot (features in column order) and the slots' validity mask.
    ``[batch, seq]`` -> ``[batch, n_max]`` float32, ``[batch, n_max]`` bool."""
    cols = problem.feature_columns().to(scores.device)  # [batch, n_max]
    values = scores.float().gather(1, cols)
    valid = torch.arange(cols.shape[1], device=cols.device)[None] < problem.n_features[:, None].to(
        cols.device
    )
    return torch.where(valid, values, torch.zeros_like(values)), valid


@torch.no_grad()
def endpoints(problem: AttributionProblem) -> tuple[Tensor, Tensor]:
    """``f(x)`` and ``f(baseline)`` (every feature removed) per row. ``[batch]`` x2, float64."""
    n_max = int(problem.n_features.max())
    rows = torch.arange(problem.n_rows).repeat(2)
    keep = torch.zeros(2 * problem.n_rows, n_max, dtype=torch.bool)
    keep[: problem.n_rows] = True
    f = problem.evaluate(rows, keep).double().cpu()
    return f[: problem.n_rows], f[problem.n_rows :]


@dataclass(frozen=True)
class ErasureCurves:
    """The target as features are removed (deletion) or inserted (insertion) one at a time in
    attribution order. Step ``i`` has the top ``i`` tokens removed (inserted);
    ``deletion[:, 0] = insertion[:, n] = f(x)``, ``deletion[:, n] = insertion[:, 0] =
    f(baseline)``. Entries past a row's ``n`` are NaN."""

    deletion: Tensor  # [batch, n_max + 1] float64
    insertion: Tensor  # [batch, n_max + 1] float64
    n: Tensor  # [batch] features per row


@torch.no_grad()
def erasure_curves(problem: AttributionProblem, scores: Tensor) -> ErasureCurves:
    """Deletion and insertion curves of every row, every step in one batched pass
    (``2 (n - 1) + 2`` target evaluations per row). Consecutive points of a curve differ in
    one feature, so where it pays each re-runs only from that feature's first column over an
    earlier point's key/value states
    (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`)."""
    values, valid = feature_values(problem, scores)
    ranks = attribution_ranks(values, valid).cpu()  # [batch, n_max]
    n = problem.n_features.cpu()
    n_max = values.shape[1]
    fx, fb = endpoints(problem)
    rows, keeps, where, parents = [], [], [], []
    base = 0
    chains = 2 * problem.n_rows
    for b in range(problem.n_rows):
        steps = torch.arange(1, int(n[b]))  # interior steps; the ends are f(x), f(baseline)
        if steps.numel() == 0:
            continue
        top = ranks[b][None] < steps[:, None]  # [steps, n_max] in the top i
        rows.append(torch.full((2 * len(steps),), b))
        keeps.append(torch.cat([~top, top]))  # deletion keeps the rest, insertion the top
        where.append(torch.stack([torch.full_like(steps, b), steps], -1))
        # Each curve's points are nested, one feature apart: a point's parent is an earlier
        # point of its curve (its first: the row or the empty row, found by the engine).
        m = len(steps)
        up = coalitions.chain_parents(m, coalitions.chain_length(m, chains, problem.batch_size))
        for curve in (base, base + m):
            parents.append(torch.where(up > 0, curve + up - 1, -1))
        base += 2 * m
    deletion = torch.full((problem.n_rows, n_max + 1), math.nan, dtype=torch.float64)
    insertion = deletion.clone()
    idx = torch.arange(problem.n_rows)
    deletion[idx, 0], deletion[idx, n] = fx, fb
    insertion[idx, 0], insertion[idx, n] = fb, fx
    if rows:
        f = problem.evaluate(
            torch.cat(rows), torch.cat(keeps), parents=torch.cat(parents), share_prefixes=True
        )
        f = f.double().cpu()
        offset = 0
        for w in where:
            m = len(w)
            b, steps = w[:, 0], w[:, 1]
            deletion[b, steps] = f[offset : offset + m]
            insertion[b, steps] = f[offset + m : offset + 2 * m]
            offset += 2 * m
    return ErasureCurves(deletion, insertion, n)


def comprehensiveness_from_curves(
    curves: ErasureCurves, fractions: Sequence[float] = FRACTIONS
) -> Tensor:
    """``f(x) - f(x without its top-k tokens)`` per fraction k. ``[batch, K]`` float64."""
    k = top_k_sizes(curves.n, fractions)  # [batch, K]
    return curves.deletion[:, :1] - curves.deletion.gather(1, k)


def sufficiency_from_curves(
    curves: ErasureCurves, fractions: Sequence[float] = FRACTIONS
) -> Tensor:
    """``f(x) - f(only the top-k tokens kept)`` per fraction k. ``[batch, K]`` float64."""
    k = top_k_sizes(curves.n, fractions)  # [batch, K]
    return curves.deletion[:, :1] - curves.insertion.gather(1, k)


def deletion_auc_from_curves(curves: ErasureCurves) -> Tensor:
    """Area under the deletion curve in units of ``f`` (nats for the default log-probability
    target): ``integral_0^1 f(x without its top t) - f(baseline) dt``, ``t`` the fraction of
    features removed (trapezoids, one per feature). A method whose top features take ``f``
    down soonest scores least. Lower is better; negative where erasing part of the prompt
    takes ``f`` below its value with every feature gone. ``[batch]`` float64."""
    fb = curves.insertion[:, 0]
    return normalised_auc(curves.deletion - fb[:, None], curves.n)


def insertion_auc_from_curves(curves: ErasureCurves) -> Tensor:
    """Area under the insertion curve in units of ``f``: ``integral_0^1 f(baseline with the
    top t inserted) - f(baseline) dt``. Higher is better. ``[batch]`` float64."""
    fb = curves.insertion[:, 0]
    return normalised_auc(curves.insertion - fb[:, None], curves.n)


def _normalised(curves: ErasureCurves, curve: Tensor, min_gap: float) -> Tensor:
    fx, fb = curves.deletion[:, 0], curves.insertion[:, 0]
    norm = normalised_curve(curve, fx, fb)
    wide = (fx - fb).abs() >= min_gap
    return torch.where(wide[:, None], norm, torch.full_like(norm, math.nan))


def deletion_auc_normalised_from_curves(curves: ErasureCurves, min_gap: float = 1.0) -> Tensor:
    """The deletion area with ``f`` rescaled to ``(f - f(baseline)) / (f(x) - f(baseline))``
    (1 at the full prompt, 0 with every feature removed; Petsiuk et al., 2018), only where
    ``|f(x) - f(baseline)| >= min_gap`` (NaN elsewhere: the rescaling divides by that gap, and
    a gap near 0 turns noise into areas of any size and either sign). Lower is better.
    ``[batch]`` float64."""
    return normalised_auc(_normalised(curves, curves.deletion, min_gap), curves.n)


def insertion_auc_normalised_from_curves(curves: ErasureCurves, min_gap: float = 1.0) -> Tensor:
    """The insertion area on the rescaled ``f`` of :func:`deletion_auc_normalised_from_curves`
    (0 with no feature, 1 with all), NaN where ``|f(x) - f(baseline)| < min_gap``. Higher is
    better. ``[batch]`` float64."""
    return normalised_auc(_normalised(curves, curves.insertion, min_gap), curves.n)


def comprehensiveness(
    problem: AttributionProblem, scores: Tensor, fractions: Sequence[float] = FRACTIONS
) -> Tensor:
    """ERASER comprehensiveness at each fraction (DeYoung et al., 2020). ``[batch, K]``"""
    return comprehensiveness_from_curves(erasure_curves(problem, scores), fractions)


def sufficiency(
    problem: AttributionProblem, scores: Tensor, fractions: Sequence[float] = FRACTIONS
) -> Tensor:
    """ERASER sufficiency at each fraction (DeYoung et al., 2020). ``[batch, K]``"""
    return sufficiency_from_curves(erasure_curves(problem, scores), fractions)


def deletion_auc(problem: AttributionProblem, scores: Tensor) -> Tensor:
    """Deletion AUC in units of ``f`` (Petsiuk et al., 2018). ``[batch]``"""
    return deletion_auc_from_curves(erasure_curves(problem, scores))


def insertion_auc(problem: AttributionProblem, scores: Tensor) -> Tensor:
    """Insertion AUC in units of ``f`` (Petsiuk et al., 2018). ``[batch]``"""
    return insertion_auc_from_curves(erasure_curves(problem, scores))


SOFT_SALT = 0x50F7
"""Mixed into each row's seed for the soft-erasure masks (held out from the methods' draws)."""


def soft_keep_probs(problem: AttributionProblem, scores: Tensor) -> Tensor:
    """Each feature's importance min-max normalised to [0, 1] over its row's features (Zhao &
    Aletras, 2023): the keep probability of its embedding's elements for soft sufficiency
    (one minus it for soft comprehensiveness). NaN rows where every score is the same (no
    ordering to follow). ``[batch, n_max]`` float64 on the CPU (0 past a row's features)."""
    values, valid = feature_values(problem, scores)
    values, valid = values.cpu().double(), valid.cpu()
    lo = torch.where(valid, values, torch.full_like(values, math.inf)).amin(-1, keepdim=True)
    hi = torch.where(valid, values, torch.full_like(values, -math.inf)).amax(-1, keepdim=True)
    span = hi - lo
    q = (values - lo) / span.clamp(min=1e-300)
    q = torch.where(valid, q, torch.zeros_like(q))
    return torch.where(span > 0, q, torch.full_like(q, math.nan))


def soft_uniforms(problem: AttributionProblem, row: int, sample: int) -> Tensor:
    """The uniform draws behind soft-erasure mask ``sample`` of ``row``: ``[t, d_model]``, one
    row per feature token (:meth:`~tokattr.methods.problem.AttributionProblem.token_columns`),
    from the row's seed (:data:`SOFT_SALT`), the same for every method and batch."""
    t = int(problem.token_columns()[1][row])
    seed = problem.seeds[row]
    gen = (
        None
        if seed is None
        else torch.Generator().manual_seed(salted_seed(seed, SOFT_SALT, sample))
    )
    return torch.rand(t, problem.embeds.shape[-1], generator=gen)


@dataclass(frozen=True)
class SoftErasure:
    """The target, on the probability scale of the paper where the target is a log-probability
    (``exp f``; ``f`` itself otherwise), at the full prompt (``p``), with every feature
    removed (``p0``), and for each of ``n_samples`` soft masks keeping the important features
    (``kept``) or removing them (``removed``)."""

    p: Tensor  # [batch] float64
    p0: Tensor  # [batch]
    kept: Tensor  # [batch, n_samples]
    removed: Tensor  # [batch, n_samples]


@torch.no_grad()
def soft_erasure(problem: AttributionProblem, scores: Tensor, n_samples: int = 8) -> SoftErasure:
    """The model evaluations behind soft sufficiency and comprehensiveness: ``n_samples``
    masks per row, each evaluated with the features kept with probability ``q`` (the
    normalised importance, :func:`soft_keep_probs`) and with probability ``1 - q``, from the
    same draws (so the two are paired, and, where rows have seeds, every method sees the same
    draws)."""
    fx, fb = endpoints(problem)
    q = soft_keep_probs(problem, scores)  # [batch, n_max]
    q_filled = torch.nan_to_num(q, nan=0.5)  # rows without an order: NaN below, any draw
    b = problem.n_rows
    rows = torch.arange(b).repeat_interleave(n_samples)
    pairs = [(r, s) for r in range(b) for s in range(n_samples)]

    drawn: dict[int, Tensor] = {}  # the same draws for both passes, even without a seed

    def uniforms(i: int) -> Tensor:
        if i not in drawn:
            drawn[i] = soft_uniforms(problem, *pairs[i])
        return drawn[i]

    kept = problem.evaluate_soft(rows, q_filled[rows], uniforms).double().cpu()
    removed = problem.evaluate_soft(rows, 1 - q_filled[rows], uniforms).double().cpu()
    scale = torch.exp if problem.log_prob_target else (lambda t: t)
    nan = q.isnan().any(-1)[:, None]
    kept, removed = (
        torch.where(nan, math.nan, scale(v.view(b, n_samples))) for v in (kept, removed)
    )
    return SoftErasure(scale(fx), scale(fb), kept, removed)


def soft_sufficiency_from(e: SoftErasure, min_gap: float = 0.01) -> Tensor:
    """Soft normalised sufficiency (Soft-NS, Zhao & Aletras, 2023), mean over the masks:
    ``max(0, S(x') - S(0)) / (1 - S(0))`` with ``S(x') = 1 - max(0, p - p(x'))``, ``x'`` the
    prompt with the features kept with probability ``q``, ``S(0)`` the sufficiency of the
    empty prompt (every feature removed). Higher is better; NaN where ``p - p0 < min_gap``
    (removing everything barely lowers the answer: dividing by that gap would let a few such
    examples dominate the mean)."""
    gap = (e.p - e.p0)[:, None]
    s_soft = 1 - (e.p[:, None] - e.kept).clamp(min=0)
    s_zero = 1 - gap.clamp(min=0)
    ns = (s_soft - s_zero).clamp(min=0) / gap.clamp(min=1e-300)
    return torch.where(gap[:, 0] >= min_gap, ns.mean(-1), torch.full_like(e.p, math.nan))


def soft_comprehensiveness_from(e: SoftErasure, min_gap: float = 0.01) -> Tensor:
    """Soft normalised comprehensiveness (Soft-NC, Zhao & Aletras, 2023), mean over the
    masks: ``max(0, p - p(x')) / (1 - S(0))``, ``x'`` the prompt with the features kept with
    probability ``1 - q`` (the important ones mostly removed). Higher is better; NaN where
    ``p - p0 < min_gap``."""
    gap = (e.p - e.p0)[:, None]
    nc = (e.p[:, None] - e.removed).clamp(min=0) / gap.clamp(min=1e-300)
    return torch.where(gap[:, 0] >= min_gap, nc.mean(-1), torch.full_like(e.p, math.nan))


def leave_one_out(problem: AttributionProblem) -> Tensor:
    """``f(x) - f(x without token j)`` for every feature slot j (0 past a row's features),
    by occlusion's own primitive (:func:`tokattr.engine.loo.leave_one_out`). ``[batch, n_max]``
    float64 on the CPU."""
    return loo.leave_one_out(problem)[1].cpu()


def loo_kendall_tau(
    problem: AttributionProblem, scores: Tensor, drops: Tensor | None = None
) -> Tensor:
    """Kendall tau-b between the scores and the leave-one-out drops ``f(x) - f(x \\ j)``
    (``drops``: :func:`leave_one_out`, where already computed). Higher is better. ``[batch]``
    float64."""
    values, valid = feature_values(problem, scores)
    drops = leave_one_out(problem) if drops is None else drops
    return kendall_tau(values.cpu(), drops, valid.cpu())


def completeness_error(problem: AttributionProblem, scores: Tensor) -> Tensor:
    """``|sum(scores) - (f(x) - f(baseline))| / |f(x) - f(baseline)|`` (the completeness axiom
    of Integrated Gradients, Sundararajan et al., 2017). Lower is better. ``[batch]``"""
    fx, fb = endpoints(problem)
    return relative_completeness_error(scores.double().sum(-1).cpu(), fx, fb)


def relative_completeness_error(total: Tensor, fx: Tensor, fb: Tensor) -> Tensor:
    """``|total - (fx - fb)| / |fx - fb|``, NaN where the gap is below :data:`GAP_EPS`."""
    gap = (fx - fb).double()
    err = (total.double() - gap).abs() / gap.abs().clamp(min=GAP_EPS)
    return torch.where(gap.abs() > GAP_EPS, err, torch.full_like(err, math.nan))


def salted_seed(seed: int, salt: int, draw: int = 0) -> int:
    """A generator seed for a metric's draws (``salt``, its ``draw``-th) of the row seeded
    ``seed``: far from the small seeds that rows and methods use (``seed + salt`` would equal
    another row's seed plus another salt), so no metric re-draws a method's samples."""
    return ((seed + salt) * 1_000_003 + draw) % 2**63


def _row_noise(
    problem: AttributionProblem, samples: int, width: int, kind: str, salt: int = 0
) -> Tensor:
    """``samples`` noise draws of ``[n, width]`` per row, each row from its own seed (plus
    ``salt``) and sized by its own count, so that a row's draws do not depend on its batch,
    its padding or its rank. ``kind``: ``"normal"`` (standard normal per feature),
    ``"unit"`` (uniform on [0, 1) per feature) or ``"uniform"`` (uniform on [-1, 1) per
    feature token). ``[batch * samples, n_max, width]`` (rows repeated in place, 0 past a
    row's count)."""
    n = (problem.token_columns()[1] if kind == "uniform" else problem.n_features).tolist()
    out = torch.zeros(problem.n_rows * samples, max(n), width)
    for b in range(problem.n_rows):
        seed = problem.seeds[b]
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(salted_seed(seed, salt) if salt else seed)
        if kind == "normal":
            x = torch.randn(samples, n[b], width, generator=gen)
        else:
            x = torch.rand(samples, n[b], width, generator=gen)
            x = 2 * x - 1 if kind == "uniform" else x
        out[b * samples : (b + 1) * samples, : n[b]] = x
    return out


INFIDELITY_SALT = 0x1F1
"""Mixed into each row's seed for infidelity's perturbations, so they are held out from the
draws of seeded methods (``kernel_shap``'s coalitions) with the same row seed."""

PERTURBATIONS = ("removal", "gaussian")
"""Infidelity's perturbations (:func:`infidelity`)."""


def infidelity(
    problem: AttributionProblem,
    scores: Tensor,
    n_perturb_samples: int = 32,
    perturbation: str = "removal",
    remove_prob: float = 0.25,
    noise_std: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """Infidelity (Yeh et al., 2019) through ``captum.metrics.infidelity``:
    ``E_I[(I . s - (f(x) - f(x - I)))^2]`` with ``I`` a perturbation of the features'
    positions on their baseline-to-input segments (token scores are attributions of exactly
    that: IG's per-token scores sum to ``f(x) - f(baseline)`` along it).

    ``perturbation="removal"`` (the default): each feature is removed (moved to its baseline,
    ``I_j = 1``) with probability ``remove_prob``, independently: Yeh et al.'s removal
    perturbations (their "square removal" for images), so ``I . s`` is the drop the scores
    predict for the removed set and ``f(x) - f(x - I)`` the drop that happens; the scores
    that minimise it are the least-squares additive fit of the drops under this distribution
    (Yeh et al. show Shapley values are the minimiser under the Shapley kernel's).
    ``"gaussian"``: every feature moves by ``I_j ~ N(0, noise_std^2)`` along its segment; on
    a model that is sure of its answer ``f`` barely moves for small steps and falls off a
    cliff for larger ones, so no additive explanation fits it (the reason removal is the
    default; see docs/metrics.md). Draws are seeded per row (:func:`salted_seed` with
    :data:`INFIDELITY_SALT`), the same for every method. ``normalize`` (Captum's option)
    rescales the scores by the least-squares optimal factor first, so methods whose scores
    differ only in scale score the same.

    Returns Captum's value, in squared units of ``f``; the ``infidelity`` metric reports its
    square root. Lower is better. ``[batch]`` float64.
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"infidelity: perturbation must be one of {PERTURBATIONS}, got {perturbation!r}"
        )
    values, valid = feature_values(problem, scores)
    values, valid = values.cpu(), valid.cpu()
    n_max = values.shape[1]
    if perturbation == "removal":
        draws = _row_noise(problem, n_perturb_samples, 1, "unit", INFIDELITY_SALT)[..., 0]
        noise = (draws < remove_prob).float() * _slots(problem, n_perturb_samples, n_max)
    else:
        noise = _row_noise(problem, n_perturb_samples, 1, "normal", INFIDELITY_SALT)[..., 0]
        noise = noise * noise_std

    def perturb(alpha: Tensor) -> tuple[Tensor, Tensor]:
        return noise, alpha - noise

    def forward(alpha: Tensor, rows: Tensor) -> Tensor:
        return problem.interpolate(rows, alpha).float().cpu()

    out = captum.metrics.infidelity(
        forward,
        perturb,
        torch.ones(problem.n_rows, n_max),
        values,
        additional_forward_args=(torch.arange(problem.n_rows),),
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=None,
        normalize=normalize,
    )
    return out.double()


def _slots(problem: AttributionProblem, samples: int, n_max: int) -> Tensor:
    """1 on each row's feature slots, 0 past them, rows repeated ``samples`` times in place.
    ``[batch * samples, n_max]`` float."""
    n = problem.n_features.cpu().repeat_interleave(samples)
    return (torch.arange(n_max)[None] < n[:, None]).float()


def max_sensitivity(
    problem: AttributionProblem,
    scores: Tensor,
    method: Method,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 8,
) -> Tensor:
    """Max-sensitivity (Yeh et al., 2019) through ``captum.metrics.sensitivity_max``: the
    largest ``||s(x~) - s(x)|| / ||s(x)||`` over ``n_perturb_samples`` inputs ``x~`` drawn
    uniformly from the L-inf ball of radius ``perturb_radius`` around the feature tokens'
    embeddings (BOS, padding and the answer stay as they are), re-running ``method`` on each.
    Noise is seeded per row; a seeded random method has sensitivity 0. Lower is better.
    ``[batch]`` float64.
    """
    d_model = problem.embeds.shape[-1]
    slots = _row_noise(problem, n_perturb_samples, d_model, "uniform") * perturb_radius
    # Feature token j of a row -> its column: [batch * samples, seq, d_model], 0 elsewhere.
    token_cols, n_tokens = problem.token_columns()
    cols = token_cols.repeat_interleave(n_perturb_samples, 0).cpu()
    valid = (
        torch.arange(cols.shape[1])[None]
        < n_tokens.cpu().repeat_interleave(n_perturb_samples)[:, None]
    )
    noise = torch.zeros(cols.shape[0], problem.embeds.shape[1], d_model)
    index = torch.where(valid, cols, torch.full_like(cols, problem.embeds.shape[1]))
    noise = torch.cat([noise, torch.zeros(cols.shape[0], 1, d_model)], 1)  # a sink column
    noise.scatter_(1, index[..., None].expand(-1, -1, d_model), slots)
    noise = noise[:, :-1].to(problem.embeds)

    def perturb(embeds: Tensor) -> Tensor:
        return embeds + noise

    def explain(
        embeds: Tensor | tuple[Tensor], additional_forward_args: tuple[Tensor]
    ) -> Tensor | tuple[Tensor]:
        # Captum passes the unperturbed inputs as a 1-tuple and expects a tuple back.
        as_tuple = isinstance(embeds, tuple)
        if as_tuple:
            (embeds,) = embeds
        rows = additional_forward_args[0].to(problem.embeds.device)
        # The rows' own baselines, masks, target inputs and seeds; the perturbed embeddings.
        sub = dataclasses.replace(problem.select(rows), embeds=embeds.detach())
        with torch.enable_grad():
            scores = method.attribute(sub).scores.float()
        if problem.grouped:  # compare feature scores (a feature's tokens summed)
            scores = sub.reduce(scores)
        return (scores,) if as_tuple else scores

    out = captum.metrics.sensitivity_max(
        explain,
        problem.embeds,
        perturb_func=perturb,
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=None,
        additional_forward_args=(torch.arange(problem.n_rows, device=problem.embeds.device),),
    )
    return out.double().cpu()


def shapley_error(scores: Tensor, exact: Tensor, feature_mask: Tensor) -> Tensor:
    """Relative L2 distance ``||s - phi|| / ||phi||`` of a Shapley estimate ``s`` to the exact
    Shapley values ``phi`` over the features (NaN where ``phi`` is all 0, or for rows whose
    exact values were not computed: pass NaN there). Lower is better. ``[batch]`` float64."""
    s = torch.where(feature_mask, scores.double(), torch.zeros_like(scores, dtype=torch.float64))
    phi = torch.where(feature_mask, exact.double(), torch.zeros_like(exact, dtype=torch.float64))
    norm = phi.norm(dim=-1)
    err = (s - phi).norm(dim=-1) / norm.clamp(min=1e-300)
    return torch.where(norm > 0, err, torch.full_like(err, math.nan))


LDS_SALT = 0x1D5
"""Mixed into each row's seed for the LDS ablations, so they are held out from the draws of
seeded methods (``context_cite``, ``kernel_shap``) with the same row seed."""


def random_ablations(
    problem: AttributionProblem, n: int, keep_prob: float, salt: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` random keep-masks per row, each feature kept with probability ``keep_prob``,
    drawn from the row's seed (plus ``salt``) and sized by its own feature count, so a row's
    ablations do not depend on its batch. ``[batch * n]`` rows, ``[batch * n, n_max]`` bool
    (True past a row's features)."""
    counts = problem.n_features.tolist()
    n_max = max(counts)
    keep = torch.ones(problem.n_rows * n, n_max, dtype=torch.bool)
    for b, k in enumerate(counts):
        seed = problem.seeds[b]
        gen = None if seed is None else torch.Generator().manual_seed(seed + salt)
        keep[b * n : (b + 1) * n, :k] = torch.rand(n, k, generator=gen) < keep_prob
    return torch.arange(problem.n_rows).repeat_interleave(n), keep


def lds(
    problem: AttributionProblem, scores: Tensor, n_ablations: int = 32, keep_prob: float = 0.5
) -> Tensor:
    """Linear datamodeling score (Park et al., 2023; ContextCite's evaluation, Cohen-Wang et
    al., 2024): Spearman correlation, over ``n_ablations`` random ablations (each feature kept
    with probability ``keep_prob``, seeded per row and held out from the methods' own draws),
    between the change the scores predict, the sum of the removed features' scores, and the
    actual change ``f(x) - f(ablated)``. Higher is better. ``[batch]`` float64, NaN where
    either side is constant."""
    values, _ = feature_values(problem, scores)
    rows, keep = random_ablations(problem, n_ablations, keep_prob, LDS_SALT)
    fx, _ = endpoints(problem)
    f = problem.evaluate(rows, keep).double().cpu().view(problem.n_rows, n_ablations)
    actual = fx[:, None] - f  # [batch, n]
    removed = (~keep).view(problem.n_rows, n_ablations, -1).double()  # [batch, n, n_max]
    predicted = (removed * values.cpu().double()[:, None]).sum(-1)  # [batch, n]
    mask = torch.ones_like(actual, dtype=torch.bool)
    return spearman(predicted, actual, mask)


def plausibility_top1(scores: Tensor, labels: Tensor) -> Tensor:
    """Whether the feature with the largest ``|score|`` among the labelled ones is a positive
    (label 1): for context attribution, whether the top segment is the one the answer came
    from. Higher is better. ``[batch]`` float64 (1 or 0), NaN for prompts without a positive
    and a negative."""
    labelled = labels >= 0
    both = ((labels == 1) & labelled).any(-1) & ((labels == 0) & labelled).any(-1)
    magnitude = torch.where(labelled, scores.abs().double(), -math.inf)
    top = magnitude.argmax(-1)
    hit = (labels.gather(1, top[:, None]).squeeze(1) == 1).double()
    return torch.where(both, hit, torch.full_like(hit, math.nan))


def plausibility_auprc(scores: Tensor, labels: Tensor) -> Tensor:
    """Normalised AUPRC of ``|score|`` for the features the answer depends on (label 1: an
    arithmetic operand's digits, sign and decimal point and the operator; a lookup's source)
    against those that cannot change it (label 0: formatting, demonstrations, other
    segments); -1 ignored. ``(AP - E[AP]) / (1 - E[AP])`` with ``E[AP]`` the expected AP of a
    random ranking (:func:`~tokattr.metrics.ranking.normalised_average_precision`): random
    scores 0, the positives ranked first 1, whatever the share of positives (on arithmetic
    prompts most tokens are operand digits, and raw AUPRC starts at 0.85). Magnitude, not
    sign: a token that pushes the answer down is still one the model uses. Higher is better.
    ``[batch]`` float64, NaN for prompts without both classes."""
    return normalised_average_precision(scores.abs(), labels)


def plausibility_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Normalised top-k precision of ``|score|``, k the number of positives (R-precision;
    labels as :func:`plausibility_auprc`): ``(precision - base rate) / (1 - base rate)``, so
    random scores 0 and the positives on top 1
    (:func:`~tokattr.metrics.ranking.normalised_precision_at_positives`). Higher is better.
    ``[batch]`` float64, NaN for prompts without both classes."""
    return normalised_precision_at_positives(scores.abs(), labels)


def randomization_spearman(scores: Tensor, random_scores: Tensor, feature_mask: Tensor) -> Tensor:
    """Spearman correlation between a method's scores on the trained model and on the same
    architecture with re-initialised weights (Adebayo et al., 2018). A method that tracks the
    model changes its scores: lower is better. ``[batch]`` float64."""
    return spearman(scores, random_scores, feature_mask)
