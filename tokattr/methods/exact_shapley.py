"""Exact Shapley values over prompt tokens, from all 2^n coalitions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput


class ExactShapley(Method):
    """Exact Shapley values: Shapley, "A Value for n-Person Games", Contributions to the
    Theory of Games II, 1953.

    The players are the prompt's features (its tokens by default; words, sentences or parts
    with ``features=``, so a long prompt of a dozen sentences has exact values); a coalition
    keeps its features and replaces the others' tokens by the baseline embedding (positions
    kept). ``phi_i = sum_{S not containing i}
    |S|! (n-|S|-1)! / n! * (f(S + i) - f(S))``, computed from the target on every one of the
    2^n coalitions (in float64). Whole-token, signed; efficiency holds exactly:
    ``sum(phi) = f(all) - f(none)``.

    Batching: the coalitions of all rows are evaluated ``batch_size`` sequences per forward.
    Refuses rows with more than ``max_tokens`` features (2^16 = 65,536 sequences at the
    default).

    Prefix reuse (``prefix_reuse``, default; built-in targets on models with a key/value
    cache): a coalition re-runs only from its last kept feature on, over the key/value states
    of the same coalition without that feature, so the 2^n coalitions cost about as many
    columns as 2^(n+1) single ones, the nodes of a binary trie over the features in column
    order, instead of 2^n full sequences
    (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`).

    Args:
        max_tokens: the most features (tokens by default) a row may have, >= 1.
        prefix_reuse: compute the columns a coalition shares with a smaller one once;
            ``False``: full passes.
    """

    gives_exact_shapley = True

    def __init__(self, max_tokens: int = 16, prefix_reuse: bool = True) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(
                f"exact_shapley: max_tokens must be an integer >= 1, got {max_tokens!r}"
            )
        if not isinstance(prefix_reuse, bool):
            raise ValueError(
                f"exact_shapley: prefix_reuse must be True or False, got {prefix_reuse!r}"
            )
        self.max_tokens = max_tokens
        self.prefix_reuse = prefix_reuse

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        too_long = max(n_features)
        if too_long > self.max_tokens:
            raise ValueError(
                f"exact_shapley enumerates all 2^n coalitions of the prompt's features; a "
                f"prompt has {too_long} features, more than max_tokens={self.max_tokens} "
                f"(2^{too_long} = {2**too_long:,} model evaluations). Use kernel_shap or "
                "shapley_sampling, coarser features (features='sentence', ...), or raise "
                "max_tokens."
            )
        n_max = too_long
        rows, keeps, parents = [], [], []
        base = 0
        for b, n in enumerate(n_features):
            keeps.append(_coalitions(n, n_max))
            rows.append(torch.full((2**n,), b, dtype=torch.long))
            last = _without_last(n)
            parents.append(torch.where(last >= 0, base + last, -1))
            base += 2**n
        values = problem.evaluate(
            torch.cat(rows), torch.cat(keeps), parents=torch.cat(parents),
            share_prefixes=self.prefix_reuse,
        ).double().cpu()  # [sum 2^n]  # fmt: skip
        phi = torch.zeros(problem.n_rows, n_max, dtype=torch.float64)  # [batch, n_max]
        start = 0
        for b, n in enumerate(n_features):
            phi[b, :n] = shapley_from_values(values[start : start + 2**n], n)
            start += 2**n
        return MethodOutput(problem.scatter(phi.to(problem.embeds.device)))


def _coalitions(n: int, width: int) -> Tensor:
    """All 2^n keep-masks, coalition ``c`` keeping token ``i`` iff bit ``i`` of ``c`` is set,
    padded with True to ``width`` columns. [2^n, width] bool"""
    codes = torch.arange(2**n)[:, None]  # [2^n, 1]
    keep = (codes >> torch.arange(n)[None]) & 1  # [2^n, n]
    pad = torch.ones(2**n, width - n, dtype=torch.long)
    return torch.cat([keep, pad], dim=1).bool()


def _without_last(n: int) -> Tensor:
    """For each coalition code ``c`` of ``n`` players, the code of the coalition without its
    last (highest) member; -1 for the empty coalition. ``[2^n]``"""
    codes = torch.arange(2**n)
    top = torch.zeros_like(codes)
    for i in range(n):
        top = torch.where((codes >> i) & 1 == 1, 1 << i, top)
    return torch.where(codes > 0, codes - top, -1)


def shapley_from_values(values: Tensor, n: int) -> Tensor:
    """Shapley values from the value of every coalition.

    Args:
        values: ``[2^n]``, ``values[c]`` the value of the coalition whose members are the set
            bits of ``c``.
        n: number of players.

    Returns:
        ``[n]`` float64 Shapley values.
    """
    values = values.double()
    codes = torch.arange(2**n)
    size = ((codes[:, None] >> torch.arange(n)[None]) & 1).sum(-1)  # [2^n] coalition sizes
    weight = torch.tensor(
        [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
        dtype=torch.float64,
    )  # [n] by coalition size (without the player)
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        without = codes[((codes >> i) & 1) == 0]  # coalitions not containing i
        gain = values[without | (1 << i)] - values[without]
        phi[i] = (weight[size[without]] * gain).sum()
    return phi
