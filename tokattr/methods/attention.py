"""Attention weights as attributions: one layer's, or rolled out through all layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokattr.methods.internals import (
    check_layer,
    eager_attention,
    needs_model,
    query_columns,
    run_model,
)
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, chunked


def attention_scores(
    problem: AttributionProblem,
    method: str,
    read: Callable[[list[Tensor], Tensor, Tensor], Tensor],
) -> Tensor:
    """Scores read from every layer's head-averaged attention, one forward per ``batch_size``
    rows with eager attention (restored after). ``read(maps, q, attended)`` gets a pass's
    per-layer ``[rows, seq', seq']`` weights (float32, query x key, over the pass's columns),
    each row's query column in them and its attended columns (``[rows, seq']`` bool), and
    returns ``[rows, seq']`` scores; only those are kept, so
    memory stays at one pass's attention weights. ``[batch, seq]`` float32, 0 off the
    features."""
    model = needs_model(problem, method)
    rows = torch.arange(problem.n_rows, device=problem.embeds.device)
    rows = rows[problem.by_length(rows)]
    q_all = query_columns(problem).to(rows.device)
    scores = torch.zeros(problem.feature_mask.shape, dtype=torch.float32, device=rows.device)

    def run(i: int, j: int) -> None:
        r = rows[i:j]
        cols = problem.trim(r)
        with torch.no_grad():
            out = run_model(problem, r, cols, output_attentions=True)
        attentions = out.attentions  # type: ignore[attr-defined]
        if not attentions or attentions[0] is None:
            raise ValueError(f"{method}: {type(model).__name__} returned no attention weights")
        maps = [a.float().mean(1) for a in attentions]  # per layer [rows, seq', seq']
        attended = problem.inputs.attention_mask[r, cols].bool().to(r.device)
        scores[r, cols] = read(maps, q_all[r] - cols.start, attended).float()

    with eager_attention(model):
        chunked(problem.n_rows, problem.batch_size, run)
    return torch.where(problem.feature_mask, scores, torch.zeros_like(scores))


def _row(matrix: Tensor, q: Tensor) -> Tensor:
    """Row ``q[b]`` of each ``matrix[b]``. ``[rows, seq]``"""
    return matrix[torch.arange(len(q), device=matrix.device), q]


def rollout_row(maps: list[Tensor], attended: Tensor, q: Tensor) -> Tensor:
    """Row ``q`` of Abnar & Zuidema's attention rollout ``R = A'_L ... A'_1``, with ``A' = (A +
    I) / 2`` re-normalised to rows of sum 1 (the residual connection as an identity half) on
    the ``attended`` columns: ``e_q A'_L ... A'_1``, a row vector carried down the layers, so
    the product of ``[seq, seq]`` matrices is never formed (``O(L seq^2)``, not ``O(L
    seq^3)``). ``maps``: per layer ``[batch, seq, seq]``; returns ``[batch, seq]``."""
    eye = torch.diag_embed(attended.float())
    v = _row(eye, q)  # [batch, seq]
    for a in reversed(maps):
        v = (v[:, None] @ _mixed(a, eye))[:, 0]
    return v


def _mixed(a: Tensor, eye: Tensor) -> Tensor:
    mixed = 0.5 * a + 0.5 * eye
    return mixed / mixed.sum(-1, keepdim=True).clamp(min=1e-12)


class Attention(Method):
    """Raw attention weights (Bahdanau, Cho & Bengio 2015 read them as alignments; Jain &
    Wallace, "Attention is not Explanation", NAACL 2019, on their limits): the weight each
    feature token gets from the column that predicts the first answer token (the last prompt
    token; for ``per_answer_token`` rows, the column before that row's answer token), averaged
    over the heads of layer ``layer`` (default: the last). Scores are in [0, 1]; a feature's
    score is the sum over its tokens.

    The model runs once per ``batch_size`` rows with eager attention (switched on this model
    instance for the call and restored after); nothing is perturbed, so ``model_evals`` counts
    that one pass per row.

    Args:
        layer: the layer to read (Python indexing: ``-1`` the last).
    """

    def __init__(self, layer: int = -1) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"attention: layer must be an integer, got {layer!r}")
        self.layer = layer

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        check_layer(needs_model(problem, "attention"), self.layer, "attention")

        def read(maps: list[Tensor], q: Tensor, attended: Tensor) -> Tensor:
            return _row(maps[self.layer], q)

        return MethodOutput(attention_scores(problem, "attention", read))


class AttentionRollout(Method):
    """Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL
    2020. Each layer's head-averaged attention, mixed half-and-half with the identity for the
    residual stream and re-normalised, is multiplied through the layers (:func:`rollout`); the
    score of a feature token is the rolled-out weight it gets from the column that predicts the
    first answer token (as :class:`Attention`). Scores are in [0, 1] and sum to at most 1 over
    the features (the rest goes to BOS and other non-feature tokens).

    One eager-attention pass per ``batch_size`` rows, as :class:`Attention`.
    """

    def __init__(self) -> None:
        pass  # no hyper-parameters

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        def read(maps: list[Tensor], q: Tensor, attended: Tensor) -> Tensor:
            return rollout_row(maps, attended, q)

        return MethodOutput(attention_scores(problem, "attention_rollout", read))
