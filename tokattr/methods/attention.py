"""Attention weights as attributions: one layer's, or rolled out through all layers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from tokattr.methods.internals import (
    check_layer,
    eager_attention,
    in_company_pass,
    needs_model,
    query_columns,
    run_model,
)
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, chunked


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, int]] | None:
    """Each decoder layer's attention module, in layer order, and where its attention weights
    sit in its output: what transformers records for ``output_attentions`` (the model classes'
    ``_can_record_outputs["attentions"]`` table, read the way transformers reads it). ``None``
    where that table is missing or does not name one module per layer."""
    found: dict[int, tuple[nn.Module, int]] = {}
    for owner in model.modules():
        table = getattr(type(owner), "_can_record_outputs", None)
        spec = table.get("attentions") if isinstance(table, dict) else None
        for one in spec if isinstance(spec, list) else [spec]:
            if one is None:
                continue
            target = one if isinstance(one, type) else getattr(one, "target_class", None)
            index = 1 if isinstance(one, type) else int(getattr(one, "index", 1))
            layer_name = None if isinstance(one, type) else getattr(one, "layer_name", None)
            if not isinstance(target, type):
                continue
            for name, module in owner.named_modules():
                if not isinstance(module, target):
                    continue
                if layer_name and f".{layer_name.strip('.')}." not in f".{name}.":
                    continue
                found.setdefault(id(module), (module, index))
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    modules = list(found.values())
    return modules if modules and (n is None or len(modules) == n) else None


@contextlib.contextmanager
def captured_attention(
    modules: list[tuple[nn.Module, int]], keep: Callable[[int, Tensor], None]
) -> Iterator[None]:
    """Hand each layer's attention weights ``[rows, heads, seq, seq]`` to ``keep(layer, w)`` as
    the layer computes them (forward hooks on the :func:`attention_modules`, removed after the
    block, also on error; passes that only keep other ranks company are skipped). Nothing
    else holds the weights, so a pass holds one layer's at a time, not every layer's as
    ``output_attentions=True`` does (12 layers x 12 heads x 4,096^2 floats, 9.7 GB, for a
    4,096-token prompt on the benchmark's 100M Llama)."""

    def hook_for(layer: int, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            w = output[index] if isinstance(output, tuple) and len(output) > index else None
            if isinstance(w, Tensor) and not in_company_pass():
                keep(layer, w)

        return hook

    handles = [m.register_forward_hook(hook_for(i, k)) for i, (m, k) in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_scores(
    problem: AttributionProblem,
    method: str,
    read: Callable[[list[Tensor], Tensor, Tensor], Tensor] | None = None,
    layer: int | None = None,
) -> Tensor:
    """Scores read from the head-averaged attention weights, one forward per ``batch_size``
    rows with eager attention (restored after). With ``layer``, the weights layer ``layer``
    gives each row's query column (the column before its first scored answer token) are the
    scores. Otherwise ``read(maps, q, attended)`` gets a pass's per-layer ``[rows, seq', seq']``
    weights (float32, query x key, over the pass's columns), each row's query column in them
    and its attended columns (``[rows, seq']`` bool), and returns ``[rows, seq']`` scores.
    Weights are averaged over heads as each layer forms them (:func:`captured_attention`), and
    only what is read is kept. ``[batch, seq]`` float32, 0 off the features."""
    model = needs_model(problem, method)
    modules = attention_modules(model)
    n_layers = len(modules) if modules is not None else _n_layers(model)
    wanted = None if layer is None else range(n_layers)[layer]
    rows = torch.arange(problem.n_rows, device=problem.embeds.device)
    rows = rows[problem.by_length(rows)]
    q_all = query_columns(problem).to(rows.device)
    scores = torch.zeros(problem.feature_mask.shape, dtype=torch.float32, device=rows.device)
    kept: dict[int, Tensor] = {}
    seen: set[int] = set()  # the layers that handed over weights in this pass
    q_now: list[Tensor] = []

    def keep(i: int, w: Tensor) -> None:
        seen.add(i)
        if wanted is None:
            kept[i] = w.float().mean(1)
        elif i == wanted:
            q = q_now[0]
            kept[i] = w[torch.arange(len(q), device=w.device), :, q].float().mean(1)

    def run(i: int, j: int) -> None:
        r = rows[i:j]
        cols = problem.trim(r)
        q = q_all[r] - cols.start
        q_now[:] = [q]
        kept.clear()
        seen.clear()
        with torch.no_grad():
            out = run_model(problem, r, cols, output_attentions=modules is None)
        if modules is None:  # no table of attention modules: the model's own output
            for k, w in enumerate(getattr(out, "attentions", None) or ()):
                if isinstance(w, Tensor):
                    keep(k, w)
        if len(seen) != n_layers:
            raise ValueError(f"{method}: {type(model).__name__} returned no attention weights")
        attended = problem.inputs.attention_mask[r, cols].bool().to(r.device)
        if wanted is not None:
            got = kept[wanted]
        else:
            assert read is not None
            got = read([kept[k] for k in range(n_layers)], q, attended)
        scores[r, cols] = got.float()
        kept.clear()

    capture = contextlib.nullcontext() if modules is None else captured_attention(modules, keep)
    with eager_attention(model), capture:
        chunked(problem.n_rows, problem.batch_size, run)
    return torch.where(problem.feature_mask, scores, torch.zeros_like(scores))


def _n_layers(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"cannot tell how many layers {type(model).__name__} has")
    return n


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

        return MethodOutput(attention_scores(problem, "attention", layer=self.layer))


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
