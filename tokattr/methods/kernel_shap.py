"""Kernel SHAP over tokens (Captum's ``KernelShap``, with an exact least-squares solver)."""

from __future__ import annotations

import captum.attr
import torch
from captum._utils.models.model import Model
from torch import Tensor
from torch.utils.data import DataLoader

from tokattr.methods.problem import AttributionProblem, MethodOutput, seeded


class WeightedLeastSquares(Model):
    """Weighted linear least squares with an intercept, solved exactly in float64.

    Captum's ``KernelShap`` fits scikit-learn's ``LinearRegression`` (``fit_intercept=True``,
    with sample weights); scikit-learn is not a tokattr dependency, so this solves the same
    problem with ``torch.linalg.lstsq``: minimise ``sum_i w_i (y_i - b - x_i . beta)^2``.
    """

    def __init__(self) -> None:
        self.weight: Tensor | None = None  # [1, n_features]
        self.bias: Tensor | None = None  # [1]

    def fit(self, train_data: DataLoader, **kwargs: object) -> dict[str, float]:
        xs, ys, ws = [], [], []
        for x, y, w in train_data:
            xs.append(x)
            ys.append(y)
            ws.append(w)
        x = torch.cat(xs).double().cpu()  # [n_samples, n_features]
        y = torch.cat(ys).double().cpu().reshape(-1)  # [n_samples]
        w = torch.cat(ws).double().cpu().reshape(-1)  # [n_samples]
        design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        root = w.sqrt()[:, None]
        solution = torch.linalg.lstsq(design * root, y[:, None] * root, driver="gelsd").solution
        # Back where Captum's tensors live (the token masks' device).
        self.weight = solution[:-1, 0][None].float().to(xs[0].device)
        self.bias = solution[-1].float().to(xs[0].device)
        return {}

    def representation(self) -> Tensor:
        assert self.weight is not None, "fit first"
        return self.weight

    def __call__(self, x: Tensor) -> Tensor:
        assert self.weight is not None and self.bias is not None, "fit first"
        return x.float() @ self.weight.T + self.bias


class KernelShap:
    """Kernel SHAP: Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions",
    NeurIPS 2017.

    Samples coalitions of prompt tokens (a removed token takes the baseline embedding, keeping
    its position) with the Shapley kernel and fits a weighted linear model to the target; the
    coefficients are the scores (whole-token, signed; nothing to reduce over ``d_model``).
    Sampling is Captum's (``KernelShap`` on a 0/1 token mask), so a seed gives the same
    coalitions as Captum; the regression is an exact float64 weighted least squares.

    Batching: per row (each row has its own regression), ``batch_size`` coalitions per forward.
    Each row draws from its own seed.

    Args:
        n_samples: coalitions sampled per row (the first two are all and none), >= 1.
    """

    def __init__(self, n_samples: int = 256) -> None:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"kernel_shap: n_samples must be an integer >= 1, got {n_samples!r}")
        self.n_samples = n_samples

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        n_features = problem.n_features.tolist()
        values = torch.zeros(problem.n_rows, max(n_features))  # [batch, n_max]
        for b, n in enumerate(n_features):
            shap = captum.attr.KernelShap(problem.mask_forward(b))
            shap.interpretable_model = WeightedLeastSquares()
            with seeded(problem.seeds[b]):
                attr = shap.attribute(
                    torch.ones(1, n, device=problem.embeds.device),
                    baselines=0.0,
                    n_samples=self.n_samples,
                    perturbations_per_eval=problem.batch_size,
                )  # [1, n]
            values[b, :n] = attr[0].float().cpu()
        return MethodOutput(problem.scatter(values.to(problem.embeds.device)))
