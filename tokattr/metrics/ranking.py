"""Pure tensor arithmetic behind the metrics: orders, top-k sizes, rank correlations, AUPRC and
areas. No model here; every function works on padded ``[batch, n]`` tensors with a mask and
returns one value per row (NaN where the value is undefined, e.g. fewer than two tokens)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.50)
"""ERASER's token fractions k (DeYoung et al., 2020)."""

GAP_EPS = 1e-6
"""Below this ``|f(x) - f(baseline)|`` a normalised curve or a relative error is undefined."""


def normalised_curve(curve: Tensor, fx: Tensor, fb: Tensor) -> Tensor:
    """``(f - f(baseline)) / (f(x) - f(baseline))`` along each row's curve (1 at the full
    prompt, 0 at the baseline), the scale of the deletion / insertion AUCs (Petsiuk et al.,
    2018). ``curve [batch, n]``, ``fx``, ``fb`` ``[batch]``; NaN rows where ``|f(x) -
    f(baseline)|`` is at most :data:`GAP_EPS` (removing every token changes nothing)."""
    gap = fx - fb  # [batch]
    ok = gap.abs() > GAP_EPS
    norm = (curve - fb[:, None]) / torch.where(ok, gap, torch.ones_like(gap))[:, None]
    return torch.where(ok[:, None], norm, torch.full_like(norm, math.nan))


def top_k_sizes(n: Tensor, fractions: Sequence[float] = FRACTIONS) -> Tensor:
    """Tokens in the top ``k`` of a row with ``n`` tokens: ``ceil(k * n)``, so at least one
    (and never more than ``n``). ``[batch]`` -> ``[batch, len(fractions)]`` long."""
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {f!r}")
    frac = torch.tensor(list(fractions), dtype=torch.float64)  # [K]
    # A tiny slack keeps 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    k = torch.ceil(n.double()[:, None].cpu() * frac[None] - 1e-9).long()  # [batch, K]
    return k.clamp(min=1).minimum(n.long().cpu()[:, None]).to(n.device)


def attribution_ranks(scores: Tensor, mask: Tensor) -> Tensor:
    """Rank of each token in attribution order (0 = highest score; ties broken by position,
    earlier first); masked-out slots rank after every token. ``[batch, n]`` -> ``[batch, n]``."""
    keyed = torch.where(mask, scores.double(), torch.full_like(scores, -math.inf).double())
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices  # [batch, n]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _pair_signs(x: Tensor, mask: Tensor) -> Tensor:
    """``sign(x_i - x_j)`` for valid pairs ``i < j``, 0 elsewhere. ``[batch, n, n]``"""
    n = x.shape[-1]
    sign = torch.sign(x[:, :, None] - x[:, None, :])  # [batch, n, n]
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    valid = mask[:, :, None] & mask[:, None, :] & upper
    return torch.where(valid, sign, torch.zeros_like(sign))


def kendall_tau(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Kendall's tau-b between ``a`` and ``b`` over each row's valid entries (scipy's default
    variant: ties count in neither concordant nor discordant pairs). NaN with fewer than two
    entries or when either side is constant. ``[batch, n]`` x2 -> ``[batch]`` float64."""
    a, b = a.double(), b.double()
    sa, sb = _pair_signs(a, mask), _pair_signs(b, mask)  # [batch, n, n]
    m = mask.sum(-1).double()  # [batch]
    pairs = m * (m - 1) / 2
    ties_a = pairs - (sa != 0).sum((1, 2)).double()
    ties_b = pairs - (sb != 0).sum((1, 2)).double()
    denom = ((pairs - ties_a) * (pairs - ties_b)).sqrt()
    num = (sa * sb).sum((1, 2))
    return torch.where(denom > 0, num / denom.clamp(min=1e-300), torch.full_like(num, math.nan))


def average_ranks(x: Tensor, mask: Tensor) -> Tensor:
    """1-based ranks within each row's valid entries, ties given their average rank (as
    ``scipy.stats.rankdata``); 0 on masked slots. ``[batch, n]`` -> ``[batch, n]`` float64."""
    x = x.double()
    pair = mask[:, None, :]  # [batch, 1, n] compare against valid entries only
    below = ((x[:, None, :] < x[:, :, None]) & pair).sum(-1).double()  # [batch, n]
    equal = ((x[:, None, :] == x[:, :, None]) & pair).sum(-1).double()  # [batch, n] incl. self
    ranks = below + (equal + 1) / 2
    return torch.where(mask, ranks, torch.zeros_like(ranks))


def pearson(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Pearson correlation over each row's valid entries; NaN when fewer than two entries or
    either side is constant. ``[batch, n]`` x2 -> ``[batch]`` float64."""
    a, b, w = a.double(), b.double(), mask.double()
    m = w.sum(-1)  # [batch]
    mean_a = (a * w).sum(-1) / m.clamp(min=1)
    mean_b = (b * w).sum(-1) / m.clamp(min=1)
    da, db = (a - mean_a[:, None]) * w, (b - mean_b[:, None]) * w
    cov = (da * db).sum(-1)
    norm = ((da**2).sum(-1) * (db**2).sum(-1)).sqrt()
    ok = (m >= 2) & (norm > 0)
    return torch.where(ok, cov / norm.clamp(min=1e-300), torch.full_like(cov, math.nan))


def spearman(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Spearman's rank correlation (Pearson on average ranks) over each row's valid entries.
    ``[batch, n]`` x2 -> ``[batch]`` float64."""
    return pearson(average_ranks(a, mask), average_ranks(b, mask), mask)


def _ranked_rows(scores: Tensor, labels: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(row, labels, scores)`` of every row with a positive and a negative, its ignored
    items (label -1) dropped: the rows where a precision is defined. float64 on the CPU."""
    for row in range(scores.shape[0]):
        keep = labels[row] >= 0
        y = labels[row][keep].double().cpu()
        if 0 < float(y.sum()) < len(y):
            yield row, y, scores[row][keep].double().cpu()


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score``
    computes it: ``sum_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds.

    Args:
        scores: ``[batch, n]`` higher means "more likely positive".
        labels: ``[batch, n]`` long: 1 positive, 0 negative, -1 ignored (padding or a token
            of neither class).

    Returns:
        ``[batch]`` float64; NaN for a row without a positive or without a negative.
    """
    out = torch.full((scores.shape[0],), math.nan, dtype=torch.float64)
    for row, y, s in _ranked_rows(scores, labels):
        n_pos = float(y.sum())
        order = torch.sort(s, descending=True, stable=True).indices
        s, y = s[order], y[order]
        tp = torch.cumsum(y, 0)
        fp = torch.cumsum(1 - y, 0)
        # One point per distinct threshold: the last index of each run of tied scores.
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        tp, fp = tp[last], fp[last]
        precision = tp / (tp + fp)
        recall = tp / n_pos
        prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
        out[row] = float(((recall - prev) * precision).sum())
    return out.to(scores.device)


def expected_average_precision(n_pos: Tensor, n: Tensor) -> Tensor:
    """The expected average precision of a ranking drawn uniformly at random (no ties) with
    ``n_pos`` positives among ``n`` items (Bestgen, "Exact expected average precision of the
    random baseline for system evaluation", PBML 103, 2015):
    ``(H_n + (n_pos - 1) / (n - 1) * (n - H_n)) / n``, ``H_n`` the n-th harmonic number. Above
    the base rate ``n_pos / n`` on short lists (13 tokens, 9 positives: 0.75 against 0.69), so
    it is what a random method scores on average. ``[batch]`` x2 -> ``[batch]`` float64."""
    n_pos, n = n_pos.double(), n.double()
    harmonic = torch.special.digamma(n + 1) + 0.5772156649015329  # H_n
    slope = torch.where(n > 1, (n_pos - 1) / (n - 1).clamp(min=1), torch.zeros_like(n))
    return (harmonic + slope * (n - harmonic)) / n.clamp(min=1)


def tie_averaged_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision ``(1/P) sum over positives of the precision at their rank``, with
    tied scores in every order equally likely (the expectation over the orders of each block
    of ties, exact): equal to :func:`average_precision` without ties, and to a random
    ranking's expected AP (:func:`expected_average_precision`) for constant scores, where
    scikit-learn's convention (one threshold per block) gives the base rate instead.

    A block of ``m`` tied items with ``k`` positives, below ``a`` items holding ``A``
    positives, adds ``k/m * sum_{j=1..m} (A + 1 + (j-1)(k-1)/(m-1)) / (a + j)``: a positive is
    equally likely at each place ``j`` of its block, with ``(j-1)(k-1)/(m-1)`` of the block's
    other positives before it on average. ``[batch, n]`` x2 -> ``[batch]`` float64, NaN for a
    row without a positive or without a negative."""
    out = torch.full((scores.shape[0],), math.nan, dtype=torch.float64)
    for row, y, s in _ranked_rows(scores, labels):
        n_pos = float(y.sum())
        values, inverse = torch.unique(s, return_inverse=True)  # ascending
        total, above, pos_above = 0.0, 0, 0.0
        for block in range(len(values) - 1, -1, -1):
            members = inverse == block
            m, k = int(members.sum()), float(y[members].sum())
            if k:
                j = torch.arange(1, m + 1, dtype=torch.float64)
                others = (j - 1) * (k - 1) / (m - 1) if m > 1 else torch.zeros(1)
                total += k / m * float(((pos_above + 1 + others) / (above + j)).sum())
            above += m
            pos_above += k
        out[row] = total / n_pos
    return out.to(scores.device)


def normalised_average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """``(AP - E[AP]) / (1 - E[AP])``: average precision (:func:`tie_averaged_precision`) rescaled
    so that a random ranking scores 0 in expectation (:func:`expected_average_precision`) and
    a perfect one 1; negative for a ranking worse than chance. ``[batch]`` float64, NaN for a
    row without a positive or without a negative."""
    ap = tie_averaged_precision(scores, labels).cpu()
    keep = labels.cpu() >= 0
    expected = expected_average_precision(((labels.cpu() == 1) & keep).sum(-1), keep.sum(-1))
    return ((ap - expected) / (1 - expected).clamp(min=1e-12)).to(scores.device)


def normalised_precision_at_positives(scores: Tensor, labels: Tensor) -> Tensor:
    """Precision of the top ``P`` items (``P`` the row's positives: R-precision, which equals
    its recall), rescaled to ``(precision - P / n) / (1 - P / n)`` so that a random ranking
    scores 0 in expectation and the positives ranked first score 1. Items tied at the cut
    count in proportion (the expectation over orders of the ties), so constant scores score
    exactly 0. ``[batch]`` float64, NaN for a row without a positive or without a negative."""
    out = torch.full((scores.shape[0],), math.nan, dtype=torch.float64)
    for row, y, s in _ranked_rows(scores, labels):
        n, n_pos = len(y), int(y.sum())
        cut = torch.sort(s, descending=True).values[n_pos - 1]  # the P-th largest score
        above = s > cut
        tied = s == cut
        hits = float(y[above].sum()) + (n_pos - int(above.sum())) * float(y[tied].mean())
        base = n_pos / n
        out[row] = (hits / n_pos - base) / (1 - base)
    return out.to(scores.device)


def normalised_auc(curve: Tensor, n: Tensor) -> Tensor:
    """Trapezoidal area under ``curve[:, 0..n]`` drawn over ``x = i / n`` in [0, 1].

    Args:
        curve: ``[batch, n_max + 1]`` values; entries past a row's ``n`` are ignored.
        n: ``[batch]`` steps per row (>= 1).

    Returns:
        ``[batch]`` float64 (NaN where the curve holds a NaN).
    """
    curve = curve.double()
    steps = torch.arange(curve.shape[1] - 1, device=curve.device)[None]  # [1, n_max]
    inside = steps < n[:, None]  # [batch, n_max] segment i -> i+1 exists
    seg = (curve[:, 1:] + curve[:, :-1]) / 2  # [batch, n_max]
    seg = torch.where(inside, seg, torch.zeros_like(seg))
    return seg.sum(-1) / n.double()
