"""Shapley values by sampling permutations (Captum's ``ShapleyValueSampling``, batched)."""

from __future__ import annotations

import torch

from tokattr.engine import coalitions  # a module, not its names: it imports this package
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, seeded


class ShapleyValueSampling(Method):
    """Shapley value sampling: Castro, Gómez & Tejada, "Polynomial calculation of the Shapley
    value based on sampling", Computers & Operations Research 2009; Štrumbelj & Kononenko,
    "An Efficient Explanation of Individual Classifications using Game Theory", JMLR 2010.

    For each of ``n_samples`` random orders of the prompt tokens, tokens are added one by one
    to the all-removed input (every token at the baseline embedding, positions kept) and each
    token is credited with the change in the target; scores are the mean over orders
    (whole-token, signed).

    Batching: Captum's ``ShapleyValueSampling`` puts at most one permutation (n sequences)
    through the model per forward; here every prefix of every permutation of every row is
    evaluated ``batch_size`` sequences per forward. The orders are drawn exactly as Captum
    draws them (``torch.randperm`` per sample, from the row's seed), so the scores equal
    Captum's with the same seed (checked in the tests). Captum evaluates ``1 + n_samples * n``
    sequences per row; here each distinct coalition runs once
    (:meth:`~tokattr.methods.problem.AttributionProblem.evaluate`): the whole prompt ends every
    permutation, and short prompts repeat many prefixes (55% of the sequences remain on the
    bundled model's 32 benchmark prompts with 25 permutations).

    Prefix reuse (``prefix_reuse``, default; built-in targets on models with a key/value
    cache): the coalitions of one permutation are nested, each one feature more than the one
    before, so a coalition re-runs only from the first column where it differs from an earlier
    step of its permutation (mostly the step before:
    :func:`~tokattr.engine.coalitions.chain_parents`), over that coalition's key/value states,
    or from where it first differs from the row or from the row with every feature removed,
    if that is later
    (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`).

    Args:
        n_samples: random permutations per row, >= 1.
        prefix_reuse: compute the columns a coalition shares with an earlier one once;
            ``False``: full passes.
    """

    def __init__(self, n_samples: int = 25, prefix_reuse: bool = True) -> None:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(
                f"shapley_sampling: n_samples must be an integer >= 1, got {n_samples!r}"
            )
        if not isinstance(prefix_reuse, bool):
            raise ValueError(
                f"shapley_sampling: prefix_reuse must be True or False, got {prefix_reuse!r}"
            )
        self.n_samples = n_samples
        self.prefix_reuse = prefix_reuse

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        n_max = max(n_features)
        rows, keeps, orders, parents = [], [], [], []
        base = 0
        for b, n in enumerate(n_features):
            with seeded(problem.seeds[b]):
                perms = torch.stack([torch.randperm(n) for _ in range(self.n_samples)])
            orders.append(perms)  # [n_samples, n] feature added at each step
            rank = torch.empty_like(perms)
            rank.scatter_(1, perms, torch.arange(n).expand(self.n_samples, n))  # step of each
            steps = torch.arange(n)[None, :, None]  # [1, steps, 1]
            keep = rank[:, None, :] <= steps  # [n_samples, steps, n] kept after each step
            keep = torch.cat([torch.zeros(1, n, dtype=torch.bool), keep.reshape(-1, n)])
            pad = torch.ones(keep.shape[0], n_max - n, dtype=torch.bool)
            keeps.append(torch.cat([keep, pad], dim=1))  # [1 + n_samples * n, n_max]
            rows.append(torch.full((keep.shape[0],), b, dtype=torch.long))
            chains = len(n_features) * self.n_samples
            up = coalitions.chain_parents(n, coalitions.chain_length(n, chains, problem.batch_size))
            up = up.repeat(self.n_samples)  # [n_samples * n]
            perm = torch.arange(self.n_samples).repeat_interleave(n)
            parent = torch.where(up > 0, base + perm * n + up, base)  # step up; 0: empty
            parents.append(torch.cat([torch.tensor([-1]), parent]))
            base += keep.shape[0]
        values = (
            problem.evaluate(
                torch.cat(rows),
                torch.cat(keeps),
                parents=torch.cat(parents),
                share_prefixes=self.prefix_reuse,
            )
            .double()
            .cpu()
        )
        phi = torch.zeros(problem.n_rows, n_max, dtype=torch.float64)  # [batch, n_max]
        start = 0
        for b, n in enumerate(n_features):
            count = 1 + self.n_samples * n
            empty, after = values[start], values[start + 1 : start + count]
            after = after.view(self.n_samples, n)  # [n_samples, steps]
            before = torch.cat([empty.expand(self.n_samples, 1), after[:, :-1]], dim=1)
            gain = after - before  # [n_samples, steps], credited to the feature added
            phi[b, :n].index_add_(0, orders[b].flatten(), gain.flatten())
            phi[b, :n] /= self.n_samples
            start += count
        return MethodOutput(problem.scatter(phi.to(problem.embeds.device)))
