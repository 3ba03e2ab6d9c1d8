"""Attention weights as attributions: one layer's, or rolled out through all layers."""

from __future__ import annotations

import torch
from torch import Tensor

from tokattr.methods.internals import eager_attention, needs_model, query_columns, run_model
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, chunked


def attention_maps(problem: AttributionProblem, method: str) -> list[Tensor]:
    """Every layer's attention weights of every row, averaged over heads, from one forward per
    ``batch_size`` rows with eager attention (restored after): per layer ``[batch, seq, seq]``
    float32 (query x key; 0 at the padding a pass leaves out)."""
    model = needs_model(problem, method)
    n, seq = problem.n_rows, problem.embeds.shape[1]
    rows = torch.arange(n, device=problem.embeds.device)
    rows = rows[problem.by_length(rows)]
    maps: list[Tensor] = []

    def run(i: int, j: int) -> None:
        r = rows[i:j]
        cols = problem.trim(r)
        with torch.no_grad():
            out = run_model(problem, r, cols, output_attentions=True)
        attentions = out.attentions  # type: ignore[attr-defined]
        if not attentions or attentions[0] is None:
            raise ValueError(f"{method}: {type(model).__name__} returned no attention weights")
        if not maps:
            maps.extend(torch.zeros(n, seq, seq, device=r.device) for _ in attentions)
        for layer, a in enumerate(attentions):  # [rows, heads, seq', seq']
            block = torch.zeros(len(r), seq, seq, device=r.device)
            block[:, cols, cols] = a.float().mean(1)
            maps[layer][r] = block

    with eager_attention(model):
        chunked(n, problem.batch_size, run)
    return maps


def rollout(maps: list[Tensor], attended: Tensor) -> Tensor:
    """Abnar & Zuidema's attention rollout: ``R = A'_L ... A'_1`` with ``A' = (A + I) / 2``
    re-normalised to rows of sum 1 (the residual connection as an identity half), over the
    attended columns only. ``maps``: per layer ``[batch, seq, seq]``; returns ``[batch, seq,
    seq]`` (rows of sum 1 at attended queries)."""
    eye = torch.diag_embed(attended.float())  # identity on the attended columns only
    out = eye
    for a in maps:
        mixed = 0.5 * a + 0.5 * eye
        mixed = mixed / mixed.sum(-1, keepdim=True).clamp(min=1e-12)
        out = mixed @ out
    return out


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
        maps = attention_maps(problem, "attention")
        if not -len(maps) <= self.layer < len(maps):
            raise ValueError(
                f"attention: layer {self.layer} does not exist; the model has {len(maps)} layers"
            )
        return MethodOutput(_at_queries(problem, maps[self.layer]))


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
        maps = attention_maps(problem, "attention_rollout")
        attended = problem.inputs.attention_mask.bool().to(problem.embeds.device)
        return MethodOutput(_at_queries(problem, rollout(maps, attended)))


def _at_queries(problem: AttributionProblem, mixing: Tensor) -> Tensor:
    """Row ``query_columns`` of each ``[seq, seq]`` mixing matrix, 0 off the features.
    ``[batch, seq]`` float32"""
    q = query_columns(problem).to(mixing.device)
    scores = mixing[torch.arange(len(q), device=mixing.device), q].float()
    return torch.where(problem.feature_mask, scores, torch.zeros_like(scores))
