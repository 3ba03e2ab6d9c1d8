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

from tokattr.engine import loo
from tokattr.methods.problem import AttributionProblem, Method
from tokattr.metrics.ranking import (
    FRACTIONS,
    GAP_EPS,
    attribution_ranks,
    average_precision,
    kendall_tau,
    normalised_auc,
    normalised_curve,
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
    (``2 (n - 1) + 2`` target evaluations per row)."""
    values, valid = feature_values(problem, scores)
    ranks = attribution_ranks(values, valid).cpu()  # [batch, n_max]
    n = problem.n_features.cpu()
    n_max = values.shape[1]
    fx, fb = endpoints(problem)
    rows, keeps, where = [], [], []
    for b in range(problem.n_rows):
        steps = torch.arange(1, int(n[b]))  # interior steps; the ends are f(x), f(baseline)
        if steps.numel() == 0:
            continue
        top = ranks[b][None] < steps[:, None]  # [steps, n_max] in the top i
        rows.append(torch.full((2 * len(steps),), b))
        keeps.append(torch.cat([~top, top]))  # deletion keeps the rest, insertion the top
        where.append(torch.stack([torch.full_like(steps, b), steps], -1))
    deletion = torch.full((problem.n_rows, n_max + 1), math.nan, dtype=torch.float64)
    insertion = deletion.clone()
    idx = torch.arange(problem.n_rows)
    deletion[idx, 0], deletion[idx, n] = fx, fb
    insertion[idx, 0], insertion[idx, n] = fb, fx
    if rows:
        f = problem.evaluate(torch.cat(rows), torch.cat(keeps)).double().cpu()
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


def _normalised(curves: ErasureCurves, curve: Tensor) -> Tensor:
    return normalised_curve(curve, curves.deletion[:, 0], curves.insertion[:, 0])


def deletion_auc_from_curves(curves: ErasureCurves) -> Tensor:
    """Area under the deletion curve normalised to ``(f - f(baseline)) / (f(x) -
    f(baseline))`` (1 at the start, 0 when every token is gone) over the fraction removed.
    Lower is better. ``[batch]`` float64, NaN where ``f(x) = f(baseline)``."""
    return normalised_auc(_normalised(curves, curves.deletion), curves.n)


def insertion_auc_from_curves(curves: ErasureCurves) -> Tensor:
    """Area under the normalised insertion curve (0 with no token, 1 with all). Higher is
    better. ``[batch]`` float64."""
    return normalised_auc(_normalised(curves, curves.insertion), curves.n)


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
    """Normalised deletion AUC (Petsiuk et al., 2018). ``[batch]``"""
    return deletion_auc_from_curves(erasure_curves(problem, scores))


def insertion_auc(problem: AttributionProblem, scores: Tensor) -> Tensor:
    """Normalised insertion AUC (Petsiuk et al., 2018). ``[batch]``"""
    return insertion_auc_from_curves(erasure_curves(problem, scores))


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


def _row_noise(problem: AttributionProblem, samples: int, width: int, kind: str) -> Tensor:
    """``samples`` noise draws of ``[n, width]`` per row (``n``: its features, or with
    ``kind="uniform"`` its feature tokens), each row from its own seed and sized by its own
    count, so that a row's draws do not depend on its batch, its padding or its rank.
    ``[batch * samples, n_max, width]`` (rows repeated in place, 0 past a row's count)."""
    n = (problem.n_features if kind == "normal" else problem.token_columns()[1]).tolist()
    out = torch.zeros(problem.n_rows * samples, max(n), width)
    for b in range(problem.n_rows):
        seed = problem.seeds[b]
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        draw = torch.randn if kind == "normal" else torch.rand
        x = draw(samples, n[b], width, generator=gen)
        out[b * samples : (b + 1) * samples, : n[b]] = x if kind == "normal" else 2 * x - 1
    return out


def infidelity(
    problem: AttributionProblem,
    scores: Tensor,
    n_perturb_samples: int = 16,
    noise_std: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """Infidelity (Yeh et al., 2019) through ``captum.metrics.infidelity``:
    ``E_I[(I . s - (f(x) - f(x - I)))^2]``.

    Token scores are attributions of each token's position on its baseline-to-input segment
    (IG's per-token scores are exactly that), so the perturbation ``I`` moves every token's
    embedding along that segment by ``I_j ~ N(0, noise_std^2)`` (``x_j - I_j (x_j - b_j)``),
    seeded per row. ``normalize`` (Captum's option) rescales the scores by the least-squares
    optimal factor first, so methods whose scores differ only in scale score the same.
    Lower is better. ``[batch]`` float64.
    """
    values, valid = feature_values(problem, scores)
    values, valid = values.cpu(), valid.cpu()
    n_max = values.shape[1]
    noise = _row_noise(problem, n_perturb_samples, 1, "normal")[..., 0] * noise_std

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
    """AUPRC of ``|score|`` for the tokens a human would point at (operand digits and operators,
    label 1) against formatting tokens (``$``, ``,``, spaces; label 0); other tokens -1.
    Magnitude, not sign: a token that pushes the answer down is still one the model uses.
    Higher is better. ``[batch]`` float64, NaN for prompts without both classes."""
    return average_precision(scores.abs(), labels)


def randomization_spearman(scores: Tensor, random_scores: Tensor, feature_mask: Tensor) -> Tensor:
    """Spearman correlation between a method's scores on the trained model and on the same
    architecture with re-initialised weights (Adebayo et al., 2018). A method that tracks the
    model changes its scores: lower is better. ``[batch]`` float64."""
    return spearman(scores, random_scores, feature_mask)
