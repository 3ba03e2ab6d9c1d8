"""Target functions: the one seam between a model and an attribution method.

A target function maps input embeddings ``[batch, seq, d_model]`` (plus fixed masks,
positions and answer ids, :class:`TargetInputs`) to one score per row ``[batch]``. Methods
only ever call such a function; tokenizers and generation stay on the other side.

All targets are teacher-forced: one forward pass over ``prompt + answer`` scores every answer
token given the prompt and the earlier answer tokens. Log-softmax is taken in float32 whatever
the model's dtype.

- :func:`log_prob` (default): ``sum_t log p(answer_t | prompt, answer_<t)``.
- :func:`prob`: ``exp`` of that, the probability of the whole answer.
- :func:`logit`: the raw logit of the first scored answer token.
- :func:`contrast`: ``log p(answer) - log p(foil)``, a second forward pass with the foil.

Which answer tokens count is ``TargetInputs.score_mask``: all of them by default, one per row
in per-answer-token mode (then :func:`logit` is that token's logit).

This module says *what* is scored. How the passes run fast (key/value-cache prefixes, packed
tree passes, the last-MLP cut, what a model supports) is :mod:`tokattr.engine`; the built-in
targets hand it their ``past=`` / ``branches=`` arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from tokattr.batching import TokenBatch
from tokattr.engine.cache import Prefix
from tokattr.engine.packing import Branches
from tokattr.engine.scoring import _score_columns, answer_log_probs


@dataclass(frozen=True)
class TargetInputs:
    """Everything a target function reads besides the embeddings, one row per sequence.

    Column ``j`` of ``labels`` is the token at column ``j``; an answer token at column ``j`` is
    scored from the logits at ``j - 1``.
    """

    attention_mask: Tensor  # [batch, seq]
    position_ids: Tensor  # [batch, seq]
    labels: Tensor  # [batch, seq] token ids (prompt + answer)
    score_mask: Tensor  # [batch, seq] bool, answer tokens that count
    slot_mask: Tensor  # [batch, seq] bool, the continuation slot (answer or foil columns)
    example_index: Tensor  # [batch] which example each row belongs to (for counting)
    foil_labels: Tensor | None = None  # [batch, seq] prompt + foil ids
    foil_attention_mask: Tensor | None = None  # [batch, seq]
    foil_score_mask: Tensor | None = None  # [batch, seq] bool
    foil_position_ids: Tensor | None = None  # [batch, seq] positions of prompt + foil

    def as_tuple(self) -> tuple[Tensor | None, ...]:
        """The fields in order, e.g. as Captum's ``additional_forward_args`` (which it expands
        along the batch dimension for steps and perturbations)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def select(self, rows: Tensor, cols: slice | None = None) -> TargetInputs:
        """The rows ``rows`` (an index tensor ``[n]``), in that order; only the columns ``cols``
        where given (the columns left out must be padding in all of those rows)."""
        if cols is None:
            return TargetInputs(*(None if t is None else t[rows] for t in self.as_tuple()))
        return TargetInputs(
            *(
                None if t is None else t[rows] if t.dim() == 1 else t[rows, cols]
                for t in self.as_tuple()
            )
        )


def target_inputs(batch: TokenBatch, per_answer_token: bool = False) -> TargetInputs:
    """The target inputs of a token batch: one row per example scoring its whole answer, or
    (``per_answer_token``) one row per answer token scoring that token alone, examples in
    order. ``example_index`` maps rows to examples."""
    n_examples, seq = batch.input_ids.shape
    device = batch.input_ids.device
    if per_answer_token:
        rows, cols = batch.answer_mask.nonzero(as_tuple=True)  # row-major: examples in order
        score = torch.zeros(len(rows), seq, dtype=torch.bool, device=device)  # [rows, seq]
        score[torch.arange(len(rows), device=device), cols] = True
    else:
        rows = torch.arange(n_examples, device=device)
        score = batch.answer_mask
    slot = torch.arange(seq, device=device) >= batch.prompt_width  # [seq]

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    return TargetInputs(
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        labels=batch.input_ids[rows],
        score_mask=score,
        slot_mask=slot[None].expand(len(rows), seq),
        example_index=rows,
        foil_labels=pick(batch.foil_ids),
        foil_attention_mask=pick(batch.foil_attention_mask),
        foil_score_mask=pick(batch.foil_mask),
        foil_position_ids=pick(batch.foil_position_ids),
    )


TargetFunction = Callable[..., Tensor]
"""``(model, embeds [batch, seq, d_model], inputs) -> scores [batch]``. A target function that
also takes ``past=`` (a key/value prefix, :class:`~tokattr.engine.cache.Prefix`) and
``branches=`` (packed trees, :class:`~tokattr.engine.packing.Branches`) says so by its
signature, and the engine may then use those fast paths (:func:`takes_fast_paths`)."""


def takes_fast_paths(fn: TargetFunction) -> bool:
    """Whether ``fn`` takes ``past=`` and ``branches=`` (the built-in log_prob, prob and logit
    do; contrast, which runs two passes, does not)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "past" in params and "branches" in params


def log_prob(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Sum over scored answer tokens of ``log p(token | prompt, earlier answer tokens)``.
    [batch] ([batch + n] with ``branches``)"""
    token_logp = answer_log_probs(
        model,
        embeds,
        inputs.attention_mask,
        inputs.position_ids,
        inputs.labels,
        inputs.score_mask,
        past,
        branches,
    )
    return token_logp.sum(-1)  # [batch]


def prob(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Probability of the scored answer tokens, ``exp(log_prob)``. [batch]
    ([batch + n] with ``branches``)"""
    return log_prob(model, embeds, inputs, past, branches).exp()


def logit(
    model: nn.Module,
    embeds: Tensor,
    inputs: TargetInputs,
    past: Prefix | None = None,
    branches: Branches | None = None,
) -> Tensor:
    """Raw logit of the first scored answer token (no softmax). [batch] ([batch + n] with
    ``branches``)"""
    first_only = inputs.score_mask & (inputs.score_mask.long().cumsum(-1) == 1)  # [batch, seq]
    _, token_logits = _score_columns(
        model,
        embeds,
        inputs.attention_mask,
        inputs.position_ids,
        inputs.labels,
        first_only,
        past,
        branches,
    )
    return token_logits.sum(-1)  # [batch] one non-zero term per row


def contrast(model: nn.Module, embeds: Tensor, inputs: TargetInputs) -> Tensor:
    """``log p(answer) - log p(foil)``, both teacher-forced on the same prompt embeddings. [batch]

    The foil's tokens replace the answer's in the continuation slot, at the foil's own
    positions (a foil longer than the answer runs past the answer's end); the prompt part of
    ``embeds`` (perturbed or not) is shared by both passes.
    """
    if inputs.foil_labels is None or inputs.foil_score_mask is None:
        raise ValueError("the contrast target needs a foil answer for every prompt")
    assert inputs.foil_attention_mask is not None
    foil_embeds = model.get_input_embeddings()(inputs.foil_labels).to(embeds.dtype)
    embeds_f = torch.where(inputs.slot_mask[..., None], foil_embeds, embeds)  # [batch, seq, d]
    foil_logp = answer_log_probs(
        model,
        embeds_f,
        inputs.foil_attention_mask,
        inputs.position_ids if inputs.foil_position_ids is None else inputs.foil_position_ids,
        inputs.foil_labels,
        inputs.foil_score_mask,
    ).sum(-1)  # [batch]
    return log_prob(model, embeds, inputs) - foil_logp


@dataclass(frozen=True)
class TokenForm:
    """A target written through per-token values of the scored columns, so rows that share
    their input and differ only in which answer tokens they score (``per_answer_token`` rows)
    can share one forward pass: ``f(row) = combine(columns(...)[row's input], row's mask)``.

    ``columns(model, embeds, inputs)``: ``[rows, k]`` per-token values on the last ``k``
    columns, for every column scored in ``inputs.score_mask``; ``combine(values, mask)``:
    ``[rows]`` from ``values [rows, k]`` and the rows' own ``mask [rows, k]``.
    """

    columns: Callable[[nn.Module, Tensor, TargetInputs], Tensor]
    combine: Callable[[Tensor, Tensor], Tensor]


def _logp_columns(model: nn.Module, embeds: Tensor, inputs: TargetInputs) -> Tensor:
    a = inputs
    return answer_log_probs(model, embeds, a.attention_mask, a.position_ids, a.labels, a.score_mask)


def logit_columns(model: nn.Module, embeds: Tensor, inputs: TargetInputs) -> Tensor:
    """Teacher-forced raw logits of the scored answer tokens, ``[rows, k]`` (0 elsewhere)."""
    a = inputs
    _, logits = _score_columns(
        model, embeds, a.attention_mask, a.position_ids, a.labels, a.score_mask
    )
    return logits


def _first_only(mask: Tensor) -> Tensor:
    return mask & (mask.long().cumsum(-1) == 1)


TOKEN_FORMS: dict[TargetFunction, TokenForm] = {
    log_prob: TokenForm(_logp_columns, lambda v, m: (v * m).sum(-1)),
    prob: TokenForm(_logp_columns, lambda v, m: (v * m).sum(-1).exp()),
    logit: TokenForm(logit_columns, lambda v, m: (v * _first_only(m)).sum(-1)),
}
"""The built-in targets' per-token forms (``contrast`` has none: two passes per row)."""
LOGIT_SUM = TokenForm(logit_columns, lambda v, m: (v * m).sum(-1))
"""The sum of the scored tokens' logits, per token (what LRP explains)."""


TARGETS: dict[str, TargetFunction] = {
    "log_prob": log_prob,
    "prob": prob,
    "logit": logit,
    "contrast": contrast,
}
"""Target functions by name."""
