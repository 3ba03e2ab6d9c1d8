"""Integrated Gradients in embedding space, every (row, step) pair batched together."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor

from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, chunked

_CAPTUM_RULES = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
)
_RULES = (*_CAPTUM_RULES, "adaptive_simpson")
INITIAL_PANELS = 4  # adaptive_simpson: Simpson panels on an even grid before refining
SPLITS_PER_ROUND = 4  # adaptive_simpson: panels halved per row in each batched round


class IntegratedGradients(Method):
    """Integrated Gradients: Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep
    Networks", ICML 2017.

    The path runs from the baseline embeddings to the input embeddings of the prompt's feature
    tokens (BOS, padding and the answer stay fixed); ``(x - x') * sum_k w_k grad f(x' + a_k (x -
    x'))`` is summed over ``d_model``, so scores are signed and add up to ``f(x) - f(baseline)``
    (completeness) as the steps grow. The baseline is the one chosen in
    :func:`tokattr.attribute` (pad embedding by default).

    Rules: with a fixed rule the nodes ``a_k`` and weights ``w_k`` are Captum's (Gauss–Legendre
    by default), so the scores equal Captum's ``IntegratedGradients`` on the embeddings
    (checked in the tests). ``rule="adaptive_simpson"`` places the same number of gradient
    evaluations where each row's path needs them: composite Simpson panels (nested, so no
    evaluation is wasted when a panel is halved; Lyness, "Notes on the adaptive Simpson
    quadrature routine", JACM 1969) whose error is known exactly for the sum of the scores,
    because every node's forward pass also gives ``f`` there and the sum's integral over a
    panel is ``f(hi) - f(lo)``. Rounds halve each row's worst panels (by that completeness
    residual, the check Sundararajan et al. recommend for choosing the number of steps; about
    an eighth of the panels per round, so O(log n_steps) rounds) until ``n_steps`` is spent.
    On trained models whose target changes sharply along the path (the bundled ``arith-tiny``:
    ten or more nats within 2% of the path) it leaves a far smaller completeness error than
    Gauss–Legendre at the same ``n_steps``; Captum has no such rule.

    Batching: the points of every row's path are flattened and go through the model
    ``grad_batch`` sequences per forward + backward pass (rows and steps mixed, so a batch of
    short prompts fills the passes; the adaptive rule runs one such list per refinement round,
    so with few prompts its passes are smaller and more numerous than Gauss–Legendre's); only
    one chunk's activations are alive at a time, which bounds memory on long prompts, and a
    chunk that runs out of accelerator memory is retried at half the size.
    ``f(x)`` and ``f(baseline)`` take one more forward per row; the convergence delta
    ``sum(scores) - (f(x) - f(baseline))`` is kept per row.

    Args:
        n_steps: gradient evaluations on the path (quadrature nodes), >= 1 (>= 3 for
            ``adaptive_simpson``, which spends an odd number: ``n_steps - 1`` when even).
        rule: quadrature rule: ``"gausslegendre"`` (default), a Riemann rule
            (``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"``) or ``"adaptive_simpson"``.
    """

    def __init__(self, n_steps: int = 64, rule: str = "gausslegendre") -> None:
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(
                f"integrated_gradients: n_steps must be an integer >= 1, got {n_steps!r}"
            )
        if rule not in _RULES:
            raise ValueError(f"integrated_gradients: unknown rule {rule!r}; choose from {_RULES}")
        if rule == "adaptive_simpson" and n_steps < 3:
            raise ValueError(
                "integrated_gradients: rule 'adaptive_simpson' needs n_steps >= 3 (one Simpson "
                f"panel), got {n_steps}"
            )
        self.n_steps = n_steps
        self.rule = rule

    def nodes(self) -> tuple[Tensor, Tensor]:
        """The quadrature nodes on ``[0, 1]`` and their weights (Captum's), float64 ``[n_steps]``
        each. Fixed rules only: the adaptive rule's nodes depend on the row."""
        if self.rule not in _CAPTUM_RULES:
            raise ValueError(f"rule {self.rule!r} has no fixed nodes: they depend on the row")
        weights, alphas = approximation_parameters(self.rule)
        return (
            torch.tensor(alphas(self.n_steps), dtype=torch.float64),
            torch.tensor(weights(self.n_steps), dtype=torch.float64),
        )

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        device = problem.embeds.device
        n_rows = problem.n_rows
        diff = problem.embeds - problem.baselines  # [batch, seq, d_model], 0 off the features
        # Rows of like length together: a chunk holds whole paths where it can, little padding.
        order = problem.by_length(torch.arange(n_rows, device=device))
        if self.rule == "adaptive_simpson":
            scores = self._adaptive_simpson(problem, diff, order)
        else:
            alphas, weights = (t.to(device) for t in self.nodes())
            rows = order.repeat_interleave(self.n_steps)  # [rows * steps]
            step = torch.arange(self.n_steps, device=device).repeat(n_rows)
            if problem.token_form is not None:  # per_answer_token: one example's rows at one
                rows, step = _siblings_together(problem, order, rows, step)  # node share a pass
            _, slopes = _path_points(problem, diff, rows, alphas[step])  # [points, seq]
            scores = torch.zeros(diff.shape[:2], dtype=torch.float32, device=device)
            scores.index_add_(0, rows, slopes * weights[step].float()[:, None])
        scores = torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
        # f(x) and f(baseline): 2 forwards per row, for the convergence delta.
        every = torch.arange(n_rows, device=device)
        keep = torch.zeros(2 * n_rows, int(problem.n_features.max()), dtype=torch.bool)
        keep[n_rows:] = True  # the baselines (nothing kept), then the inputs (all kept)
        ends = problem.evaluate(every.repeat(2), keep)  # [2 * batch]
        f_base, fx = ends[:n_rows], ends[n_rows:]
        delta = scores.double().sum(-1) - (fx.double() - f_base.double())
        return MethodOutput(scores=scores, delta=delta.float(), fx=fx.float())

    def _adaptive_simpson(self, problem: AttributionProblem, diff: Tensor, order: Tensor) -> Tensor:
        """Per-token scores ``[batch, seq]`` from nested Simpson panels refined per row.

        A row's nodes depend only on its own values, but the choice between two panels with
        nearly equal residuals can go either way with float rounding (which differs with the
        other rows of a pass); the scores then differ by about the integration error.
        """
        device, n, n_rows = problem.embeds.device, self.n_steps, problem.n_rows
        alpha = np.zeros((n_rows, n))  # node positions, per row
        f = np.zeros((n_rows, n))  # the target at the nodes
        df = np.zeros((n_rows, n))  # df/da at the nodes (the per-token slopes summed)
        slopes = torch.zeros(n_rows, n, diff.shape[1], dtype=torch.float32)  # per-token df/da
        # Nodes closer than the model dtype resolves give the same input: stop refining there.
        min_width = 4 * torch.finfo(problem.embeds.dtype).eps
        first = min(INITIAL_PANELS, (n - 1) // 2)
        # Panels as (lo, mid, hi) node slots; an even grid of `first` panels to start.
        panels = [[(2 * i, 2 * i + 1, 2 * i + 2) for i in range(first)] for _ in range(n_rows)]
        used = [2 * first + 1] * n_rows  # slots taken (evaluated or scheduled), per row
        todo = [(r, i, i / (2 * first)) for r in order.tolist() for i in range(2 * first + 1)]
        while todo:  # one batched list of gradient passes per round
            rows = [r for r, _, _ in todo]
            slot = [i for _, i, _ in todo]
            at = torch.tensor([a for _, _, a in todo], dtype=torch.float64)
            f_new, s_new = _path_points(
                problem, diff, torch.tensor(rows, device=device), at.to(device)
            )
            s_new = s_new.cpu()
            alpha[rows, slot] = at.numpy()
            f[rows, slot] = f_new.double().cpu().numpy()
            df[rows, slot] = s_new.double().sum(-1).numpy()
            slopes[rows, slot] = s_new
            todo = []
            for r in order.tolist():
                room = (n - used[r]) // 2  # panels this row can still halve
                if room == 0:
                    continue
                lo, mid, hi = np.asarray(panels[r]).T
                width = alpha[r, hi] - alpha[r, lo]
                # Simpson's error for the sum of the scores over a panel is known exactly.
                err = np.abs(
                    width / 6 * (df[r, lo] + 4 * df[r, mid] + df[r, hi]) - (f[r, hi] - f[r, lo])
                )
                err[width < min_width] = -1.0
                # Halve an eighth of the panels per round (at least SPLITS_PER_ROUND): greedy
                # enough to follow the residuals (a quarter measured worse), O(log n_steps) rounds.
                k = min(max(SPLITS_PER_ROUND, len(err) // 8), room, int((err >= 0).sum()))
                for i in sorted(np.argsort(-err, kind="stable")[:k].tolist(), reverse=True):
                    p_lo, p_mid, p_hi = panels[r].pop(i)
                    q1, q2 = used[r], used[r] + 1
                    used[r] += 2
                    panels[r] += [(p_lo, q1, p_mid), (p_mid, q2, p_hi)]
                    todo += [
                        (r, q1, (alpha[r, p_lo] + alpha[r, p_mid]) / 2),
                        (r, q2, (alpha[r, p_mid] + alpha[r, p_hi]) / 2),
                    ]
        weights = np.zeros((n_rows, n))
        for r in range(n_rows):
            lo, mid, hi = np.asarray(panels[r]).T
            h = (alpha[r, hi] - alpha[r, lo]) / 6
            np.add.at(weights[r], lo, h)
            np.add.at(weights[r], mid, 4 * h)
            np.add.at(weights[r], hi, h)
        scores = torch.einsum("rn,rns->rs", torch.from_numpy(weights).float(), slopes)
        return scores.to(device)


def _path_points(
    problem: AttributionProblem, diff: Tensor, rows: Tensor, alphas: Tensor
) -> tuple[Tensor, Tensor]:
    """The target ``f`` ``[points]`` and its per-token derivative along the path,
    ``grad f . (x - x')`` summed over ``d_model`` ``[points, seq]`` (float32), at the points
    ``baseline[rows[i]] + alphas[i] * (x - x')[rows[i]]``, ``grad_batch`` points per pass."""
    dtype = problem.embeds.dtype
    f_out = torch.empty(len(rows), dtype=torch.float32, device=diff.device)
    slopes = torch.zeros(len(rows), diff.shape[1], dtype=torch.float32, device=diff.device)

    def run(i: int, j: int) -> None:
        r, a = rows[i:j], alphas[i:j]
        cols = problem.trim(r)  # the columns outside are padding in every row of the chunk
        # In float32 at least: nearby nodes must not round to one point in half precision.
        x = problem.baselines[r, cols].float() + a.float()[:, None, None] * diff[r, cols].float()
        f, grad = problem.value_and_grad(x.to(dtype), r, cols)
        f_out[i:j] = f.float()
        slopes[i:j, cols] = (grad.float() * diff[r, cols].float()).sum(-1)

    chunked(len(rows), problem.shared_grad_batch, run)
    return f_out, slopes


def _siblings_together(
    problem: AttributionProblem, order: Tensor, rows: Tensor, step: Tensor
) -> tuple[Tensor, Tensor]:
    """The points reordered so that the rows of one example (its answer tokens, adjacent in
    ``order``) come together at each node: ``(example, node, row)``, so a pass holds inputs
    they share (:meth:`~AttributionProblem.value_and_grad`)."""
    examples = problem.inputs.example_index[order]  # [rows]
    group = torch.cumsum(
        torch.cat([examples.new_zeros(1), (examples[1:] != examples[:-1]).long()]), 0
    )
    n_rows, n_steps = len(order), int(step.max()) + 1
    at = torch.arange(n_rows, device=rows.device).repeat_interleave(n_steps)  # place in order
    key = (group[at] * n_steps + step) * n_rows + at
    new = torch.argsort(key)
    return rows[new], step[new]
