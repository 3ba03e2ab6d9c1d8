"""LIME: a weighted sparse linear surrogate fit on random feature removals."""

from __future__ import annotations

import torch
from torch import Tensor

from tokattr.methods.context_cite import lasso
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, seeded


class Lime(Method):
    """LIME: Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions
    of Any Classifier", KDD 2016; Captum's ``Lime`` with its defaults.

    Each row is evaluated on ``n_samples`` random coalitions of its features, each kept with
    probability 1/2 (removed features' tokens take the baseline embedding, positions kept), in
    Captum's interpretable space: one ``torch.bernoulli`` draw of ``[1, n_features]`` per
    sample, from the row's seed. Each sample is weighted by Captum's default similarity, the
    exponential kernel ``exp(-d^2 / (2 kernel_width^2))`` of the cosine distance ``d = 1 -
    cos(x, x_perturbed)`` between the row's whole embedded sequence (prompt and answer, no
    padding) and its perturbed copy; a LASSO with an intercept and penalty ``alpha`` (Captum's
    default ``SkLearnLasso(alpha=0.01)``, unstandardised inputs, solved by
    :func:`~tokattr.methods.context_cite.lasso` to scikit-learn's objective) is fit to the
    target on the 0/1 keep masks; its coefficients are the scores (signed, one per feature).
    A seed gives Captum's samples and scores (checked in the tests).

    Batching: every coalition of every row goes through the model ``batch_size`` sequences per
    forward, each distinct one once
    (:meth:`~tokattr.methods.problem.AttributionProblem.evaluate`); Captum evaluates
    ``perturbations_per_eval`` perturbations of one input at a time. The similarities come
    from per-feature dot products, without building the perturbed sequences.

    Args:
        n_samples: coalitions per row, >= 2.
        kernel_width: width of the similarity kernel, > 0.
        alpha: the LASSO penalty, >= 0 (0: weighted least squares).
        prefix_reuse: re-run each coalition only from where it first differs from a
            neighbouring one (:func:`tokattr.engine.coalitions.evaluate_sharing_prefixes`,
            where the target allows it and it saves enough); ``False``: full passes.
    """

    def __init__(
        self,
        n_samples: int = 256,
        kernel_width: float = 1.0,
        alpha: float = 0.01,
        prefix_reuse: bool = True,
    ) -> None:
        if not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"lime: n_samples must be an integer >= 2, got {n_samples!r}")
        if not isinstance(kernel_width, int | float) or kernel_width <= 0:
            raise ValueError(f"lime: kernel_width must be a number > 0, got {kernel_width!r}")
        if not isinstance(alpha, int | float) or alpha < 0:
            raise ValueError(f"lime: alpha must be a number >= 0, got {alpha!r}")
        if not isinstance(prefix_reuse, bool):
            raise ValueError(f"lime: prefix_reuse must be True or False, got {prefix_reuse!r}")
        self.n_samples = n_samples
        self.kernel_width = float(kernel_width)
        self.alpha = float(alpha)
        self.prefix_reuse = prefix_reuse

    def masks(self, problem: AttributionProblem) -> Tensor:
        """Each row's coalitions, ``[batch, n_samples, n_max]`` bool (True past a row's
        features), drawn as Captum's ``default_perturb_func`` draws them from the row's seed."""
        counts = problem.n_features.tolist()
        out = torch.ones(problem.n_rows, self.n_samples, max(counts), dtype=torch.bool)
        for b, n in enumerate(counts):
            with seeded(problem.seeds[b]):
                draws = [torch.bernoulli(torch.ones(1, n) * 0.5) for _ in range(self.n_samples)]
            out[b, :, :n] = torch.cat(draws).bool()
        return out

    def similarity(self, problem: AttributionProblem, keep: Tensor) -> Tensor:
        """Captum's default kernel between each row's sequence and its coalitions,
        ``[batch, n_samples]`` float64 (``keep`` as from :meth:`masks`)."""
        attended = problem.inputs.attention_mask.bool().to(problem.embeds.device)
        x, b = problem.embeds.double(), problem.baselines.double()
        xx = torch.where(attended, (x * x).sum(-1), 0.0)  # [batch, seq]
        xb = torch.where(attended, (x * b).sum(-1), 0.0)
        bb = torch.where(attended, (b * b).sum(-1), 0.0)
        per_feature = torch.stack([problem.reduce(t) for t in (xx, xb, bb)]).double().cpu()
        a, ab, bsq = per_feature  # [batch, n_max] each: sums over each feature's columns
        rest = (xx.sum(-1).cpu() - a.sum(-1))[:, None]  # the columns off the features
        k = keep[:, :, : a.shape[1]].double()  # [batch, samples, n_max]
        dot = rest + (k * a[:, None]).sum(-1) + ((1 - k) * ab[:, None]).sum(-1)
        norm_p = (rest + (k * a[:, None]).sum(-1) + ((1 - k) * bsq[:, None]).sum(-1)).sqrt()
        norm_x = (rest + a.sum(-1, keepdim=True)).sqrt()
        cos = dot / (norm_x * norm_p).clamp(min=1e-8)
        distance = 1 - cos
        return torch.exp(-(distance**2) / (2 * self.kernel_width**2))

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        keep = self.masks(problem)  # [batch, s, n_max]
        n_rows, s, n_max = keep.shape
        rows = torch.arange(n_rows).repeat_interleave(s)
        y = problem.evaluate(rows, keep.view(-1, n_max), share_prefixes=self.prefix_reuse)
        y = y.double().cpu().view(n_rows, s)
        sim = self.similarity(problem, keep)  # [batch, s]
        weights = torch.zeros(n_rows, n_max, dtype=torch.float64)
        for b, n in enumerate(problem.n_features.tolist()):
            w, _ = lasso(
                keep[b, :, :n].double(), y[b], self.alpha, sample_weight=sim[b], standardize=False
            )
            weights[b, :n] = w
        return MethodOutput(problem.scatter(weights.to(problem.embeds.device)))
