"""Token batches -> :class:`~tokattr.methods.problem.AttributionProblem`: the input
embeddings, the baselines (the removed token's replacement, positions kept), how many
sequences a pass may hold, and the target calls with the engine's fast paths where the model
supports them. What methods and metrics alike work on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tokattr.batching import TokenBatch
from tokattr.engine.cache import Prefix
from tokattr.engine.capabilities import supports_branches, supports_prefix
from tokattr.engine.memory import ModelShape, sequences_per_pass, states_budget
from tokattr.engine.packing import Branches
from tokattr.methods.problem import AttributionProblem, Forward
from tokattr.models import LanguageModel
from tokattr.targets import TargetFunction, TargetInputs, log_prob, target_inputs
from tokattr.validation import check_baseline, target_function

DEFAULT_BATCH_SIZE = 64
"""Prompts attributed together, and sequences per forward pass, unless sized to memory."""


def pass_sizes(
    lm: LanguageModel, batch: TokenBatch, batch_size: int | None, memory_budget: int | None
) -> tuple[int, int]:
    """Sequences per forward pass and per forward + backward pass for this batch: ``batch_size``
    when given (capped by ``memory_budget`` when that is given too), else sized to the budget
    (:func:`tokattr.engine.memory.sequences_per_pass`)."""
    if batch_size is not None and memory_budget is None:
        return batch_size, batch_size
    seq = batch.input_ids.shape[1]
    scored = seq - batch.prompt_width + 1
    sizes = tuple(
        sequences_per_pass(lm.model, seq, grad, memory_budget, scored) for grad in (False, True)
    )
    if batch_size is not None:
        return min(sizes[0], batch_size), min(sizes[1], batch_size)
    return sizes[0], sizes[1]


def embeddings_and_baselines(
    lm: LanguageModel, batch: TokenBatch, baseline: str = "pad"
) -> tuple[Tensor, Tensor]:
    """The batch's input embeddings and their baselines (``baseline`` on the features, the
    inputs elsewhere), both ``[batch, seq, d_model]`` and detached."""
    check_baseline(baseline)
    layer = lm.model.get_input_embeddings()
    with torch.no_grad():
        embeds = layer(batch.input_ids).detach()  # [batch, seq, d_model]
        base = _baseline_vector(lm, baseline, layer.weight)  # [d_model]
        baselines = torch.where(batch.feature_mask[..., None], base.to(embeds.dtype), embeds)
    return embeds, baselines


def batch_problem(
    lm: LanguageModel,
    batch: TokenBatch,
    baseline: str = "pad",
    target_fn: str | TargetFunction = "log_prob",
    seeds: Sequence[int | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> AttributionProblem:
    """One :class:`AttributionProblem` row per example of ``batch``, scoring its whole answer:
    what the faithfulness metrics re-evaluate, with the same baseline rule and the same fast
    paths (key/value prefixes, packed trees where the model supports them) as the methods."""
    fn, _ = target_function(target_fn)
    embeds, baselines = embeddings_and_baselines(lm, batch, baseline)
    n = batch.input_ids.shape[0]
    return AttributionProblem(
        forward=target_forward(lm, fn),
        embeds=embeds,
        baselines=baselines,
        feature_mask=batch.feature_mask,
        inputs=target_inputs(batch),
        batch_size=batch_size,
        seeds=tuple(seeds) if seeds is not None else (None,) * n,
        prefix_ok=supports_prefix(lm, fn),
        branches_ok=supports_branches(lm, fn),
        shape=ModelShape.of(lm.model),
        feature_ids=batch.feature_ids,
        log_prob_target=fn is log_prob,
        model=lm.model,
        states_budget=states_budget(lm.device),
    )


def target_forward(lm: LanguageModel, fn: TargetFunction) -> Forward:
    """``fn`` on this model as a problem's ``forward``: ``(embeds, rows)``, and with
    ``past=`` / ``branches=`` where the problem allows them."""
    model = lm.model

    def forward(
        x: Tensor, rows: TargetInputs, past: Prefix | None = None, branches: Branches | None = None
    ) -> Tensor:
        if past is None and branches is None:
            return fn(model, x, rows)
        return fn(model, x, rows, past=past, branches=branches)

    return forward


def _baseline_vector(lm: LanguageModel, baseline: str, weight: Tensor) -> Tensor:
    if baseline == "zero":
        return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
    token_id = lm.tokenizer.pad_token_id if baseline == "pad" else lm.tokenizer.unk_token_id
    if token_id is None:
        raise ValueError(f"baseline {baseline!r}: the tokenizer has no {baseline} token")
    return weight[token_id].detach()
