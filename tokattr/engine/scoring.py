"""Teacher-forced scoring of answer tokens: one pass, a pass from a key/value prefix, or a
packed pass with branches; what every built-in target function calls."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokattr.engine import packing
from tokattr.engine.cache import Prefix, cache_kwarg
from tokattr.engine.packing import Branches
from tokattr.engine.tail import _takes_logits_to_keep, last_mlp_on_tail


def answer_log_probs(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Teacher-forced log-probabilities of the scored tokens, 0 elsewhere.

    Args:
        embeds: ``[batch, seq, d_model]`` input embeddings.
        attention_mask, position_ids, labels: ``[batch, seq]``.
        score_mask: ``[batch, seq]`` bool, the tokens to score (never column 0).
        past: the first columns' key/value states (:class:`Prefix`); ``None``: run them all.
        branches: copies of rows that differ from a column on, scored in the same pass
            (:class:`Branches`); their rows of the result follow the batch's.

    Returns:
        ``[batch, k]`` (``[batch + n, k]`` with ``branches``) log p of the token at each of the
        last ``k`` columns (``k`` covers every scored column), 0 where ``score_mask`` is False.
    """
    token_logp, _ = _score_columns(
        model, embeds, attention_mask, position_ids, labels, score_mask, past, branches
    )
    return token_logp


def answer_logits(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
) -> Tensor:
    """Teacher-forced raw logits of the scored answer tokens (no softmax), 0 elsewhere: what
    LRP explains. ``[batch, k]`` float32, as :func:`answer_log_probs`' columns."""
    _, token_logits = _score_columns(
        model, embeds, attention_mask, position_ids, labels, score_mask
    )
    return token_logits


def _score_columns(
    model: nn.Module,
    embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    score_mask: Tensor,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> tuple[Tensor, Tensor]:
    if branches is not None:
        if past is not None:
            raise ValueError("a call takes a key/value prefix or branches, not both")
        return packing._packed_score_columns(  # looked up here: patchable
            model, embeds, attention_mask, position_ids, labels, score_mask, branches
        )
    seq = embeds.shape[1]
    scored_cols = score_mask.any(0).nonzero()
    if scored_cols.numel() == 0:
        raise ValueError("no answer token to score")
    first = int(scored_cols.min())
    if first == 0:
        raise ValueError("column 0 cannot be scored: nothing precedes it")
    keep = seq - first + 1  # logits at columns first-1 .. seq-1
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
    if past is None:
        kwargs["use_cache"] = False
    else:
        if past.offset > first - 1:
            raise ValueError(f"a prefix of {past.offset} columns covers a scored column")
        embeds, position_ids = embeds[:, past.offset :], position_ids[:, past.offset :]
        name = cache_kwarg(type(model))
        if name is None:
            raise TypeError(f"{type(model).__name__}.forward takes no key/value cache")
        kwargs.update({name: past.cache, "use_cache": True})
    with last_mlp_on_tail(model, embeds.shape[1], keep):
        out = model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
    logits = out.logits[:, -keep:-1]  # [batch, k, vocab] predicting columns first .. seq-1
    target_ids = labels[:, first:]  # [batch, k]
    mask = score_mask[:, first:]  # [batch, k]
    token_logits = logits.gather(-1, target_ids[..., None]).squeeze(-1).float()  # [batch, k]
    token_logp = token_logits - logits.float().logsumexp(-1)  # [batch, k]
    zero = torch.zeros((), dtype=token_logp.dtype, device=token_logp.device)
    return torch.where(mask, token_logp, zero), torch.where(mask, token_logits, zero)
