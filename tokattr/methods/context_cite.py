"""ContextCite: a sparse linear surrogate of the target fit on random feature ablations."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, seeded


class ContextCite(Method):
    """ContextCite: Cohen-Wang, Shah, Georgiev & Madry, "ContextCite: Attributing Model
    Generation to Context", NeurIPS 2024.

    Each row is evaluated on ``n_ablations`` random ablations that keep every feature with
    probability ``keep_prob`` (removed features' tokens at the baseline embedding, positions
    kept; seeded from the row's seed like the other random methods). A LASSO on the 0/1 keep
    masks, standardised, with an intercept and penalty ``alpha``, is fit to the target; its
    coefficients, back on the 0/1 scale, are the scores. As in the paper's code
    (``LassoRegression``): the target is divided by the number of answer tokens for the fit
    and the weights multiplied back, and the answer's log-probability ``log p`` (the default
    target) is first turned into the logit-scaled probability ``log p - log(1 - p)``.
    (The paper's code sums the per-token logit-probabilities of a multi-token answer; here the
    answer's probability as a whole is scaled, the same for one-token answers.)

    Features are best coarse (sentences, documents, demonstrations: ``features=``): the
    surrogate has one coefficient per feature and ``n_ablations`` observations.

    Batching: every ablation of every row goes through the model ``batch_size`` sequences per
    forward (:meth:`~tokattr.methods.problem.AttributionProblem.evaluate`, each distinct
    ablation once); the fits run per row by coordinate descent in float64
    (:func:`lasso`), to the objective of scikit-learn's ``Lasso``.

    Args:
        n_ablations: random ablations per row, >= 2.
        keep_prob: probability that an ablation keeps a feature, in (0, 1).
        alpha: the LASSO penalty (scikit-learn's ``alpha``), >= 0.
        logit: fit the logit-scaled probability; ``None`` (default): where the target is the
            answer's log-probability (``target_fn="log_prob"``), else the target as it is
            (``prob``, ``logit``, ``contrast``, a custom function); ``True``: always (the
            target must be a log-probability, values <= 0); ``False``: never.
        prefix_reuse: re-run each ablation only from where it first differs from a
            neighbouring one (in lexicographic order) or from the row: the columns before the
            first feature (a system prompt, instructions) run once per row
            (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`, where the target
            allows it and it saves enough); ``False``: full passes.
    """

    def __init__(
        self,
        n_ablations: int = 64,
        keep_prob: float = 0.5,
        alpha: float = 0.01,
        logit: bool | None = None,
        prefix_reuse: bool = True,
    ) -> None:
        if not isinstance(n_ablations, int) or n_ablations < 2:
            raise ValueError(
                f"context_cite: n_ablations must be an integer >= 2, got {n_ablations!r}"
            )
        if not isinstance(keep_prob, int | float) or not 0 < keep_prob < 1:
            raise ValueError(f"context_cite: keep_prob must be in (0, 1), got {keep_prob!r}")
        if not isinstance(alpha, int | float) or alpha < 0:
            raise ValueError(f"context_cite: alpha must be >= 0, got {alpha!r}")
        if logit is not None and not isinstance(logit, bool):
            raise ValueError(f"context_cite: logit must be True, False or None, got {logit!r}")
        if not isinstance(prefix_reuse, bool):
            raise ValueError(
                f"context_cite: prefix_reuse must be True or False, got {prefix_reuse!r}"
            )
        self.n_ablations = n_ablations
        self.keep_prob = float(keep_prob)
        self.alpha = float(alpha)
        self.logit = logit
        self.prefix_reuse = prefix_reuse

    def masks(self, problem: AttributionProblem) -> Tensor:
        """Each row's ablations, ``[batch, n_ablations, n_max]`` bool (True past a row's
        features), drawn from the row's seed and sized by its own feature count."""
        counts = problem.n_features.tolist()
        out = torch.ones(problem.n_rows, self.n_ablations, max(counts), dtype=torch.bool)
        for b, n in enumerate(counts):
            with seeded(problem.seeds[b]):
                out[b, :, :n] = torch.rand(self.n_ablations, n) < self.keep_prob
        return out

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        keep = self.masks(problem)  # [batch, m, n_max]
        n_rows, m, n_max = keep.shape
        rows = torch.arange(n_rows).repeat_interleave(m)
        y = problem.evaluate(rows, keep.view(-1, n_max), share_prefixes=self.prefix_reuse)
        y = y.double().cpu().view(n_rows, m)
        if self.logit or (self.logit is None and problem.log_prob_target):
            if bool((y > 0).any()):
                raise ValueError(
                    "context_cite: logit=True needs a log-probability target (values <= 0); "
                    "pass logit=False for this target function"
                )
            y = y - torch.log(-torch.expm1(y)).clamp(min=-1e4)  # log p - log(1 - p)
        n_tokens = problem.inputs.score_mask.sum(-1).double().cpu().clamp(min=1)  # [batch]
        valid = torch.arange(n_max)[None] < problem.n_features.cpu()[:, None]  # [batch, n_max]
        weights = torch.zeros(n_rows, n_max, dtype=torch.float64)
        for b in range(n_rows):
            n = int(valid[b].sum())
            w, _ = lasso(keep[b, :, :n].double(), y[b] / n_tokens[b], self.alpha)
            weights[b, :n] = w * n_tokens[b]
        return MethodOutput(problem.scatter(weights.to(problem.embeds.device)))


def lasso(
    x: Tensor,
    y: Tensor,
    alpha: float,
    max_iter: int = 10_000,
    tol: float = 1e-10,
    sample_weight: Tensor | None = None,
    standardize: bool = True,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_pipeline(StandardScaler(), Lasso(alpha, fit_intercept=True))``
    fit (``standardize=False``: ``Lasso`` alone), with the weights and intercept mapped back
    to the unscaled inputs: minimise ``(1 / 2W) sum_i w_i (y_i - b - z_i . beta)^2 + alpha
    ||beta||_1`` over the standardised columns ``z`` (a constant column scales by 1, as the
    scaler does; ``w_i`` the sample weights, 1 by default, ``W`` their sum, as scikit-learn
    rescales them), by cyclic coordinate descent in float64 until no weight moves by more than
    ``tol``.

    Args:
        x: ``[m, n]`` inputs (the keep masks).
        y: ``[m]`` targets.
        sample_weight: ``[m]`` non-negative weights of the observations (LIME's kernel).
        standardize: scale each column to unit variance first (ContextCite); the means are
            always removed (the intercept).

    Returns:
        ``[n]`` weights and the intercept on the unscaled inputs (float64).
    """
    xs, ys = x.double().cpu().numpy(), y.double().cpu().numpy()
    m, n = xs.shape
    sw = np.ones(m) if sample_weight is None else sample_weight.double().cpu().numpy()
    sw = sw * m / sw.sum()  # scikit-learn's rescaling: weights that sum to m
    mean = (sw[:, None] * xs).sum(0) / m
    scale = xs.std(0) if standardize else np.ones(n)
    scale = np.where(scale > 0, scale, 1.0)
    root = np.sqrt(sw)
    z = np.ascontiguousarray(((xs - mean) / scale * root[:, None]).T)  # [n, m], weighted mean 0
    y_mean = (sw * ys).sum() / m
    resid = (ys - y_mean) * root  # the intercept absorbs the mean; z's rows have mean 0
    w = np.zeros(n)
    norms = (z * z).sum(1)  # [n]
    threshold = alpha * m
    for _ in range(max_iter):
        largest = 0.0
        for j in range(n):
            if norms[j] == 0.0:
                continue
            old = w[j]
            rho = z[j] @ resid + norms[j] * old
            new = np.sign(rho) * max(abs(rho) - threshold, 0.0) / norms[j]
            if new != old:
                resid -= z[j] * (new - old)
                w[j] = new
                largest = max(largest, abs(new - old))
        if largest <= tol:
            break
    weight = w / scale
    bias = y_mean - (mean / scale) @ w
    return torch.from_numpy(weight), torch.tensor(float(bias), dtype=torch.float64)
