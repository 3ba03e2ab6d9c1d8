"""What the methods that read a model's internals share: eager attention inside a ``with``
block, the query column a row is scored at, and plain forward passes over a problem's rows.

Attention weights exist only where the attention is computed explicitly ("eager"); SDPA and
flash kernels never form them. :func:`eager_attention` switches the model instance (never its
class) for the block and restores the implementation it had after it, also on error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from tokattr.methods.problem import AttributionProblem

_COMPANY = threading.local()


@contextlib.contextmanager
def company_pass() -> Iterator[None]:
    """Marks a pass run only to keep other processes company (a sharded model's dummy pass,
    :class:`tokattr.lightning.sharding.Lockstep`): hooks that capture a method's own passes
    skip it (:func:`in_company_pass`)."""
    before = getattr(_COMPANY, "on", False)
    _COMPANY.on = True
    try:
        yield
    finally:
        _COMPANY.on = before


def in_company_pass() -> bool:
    """Whether this thread is inside :func:`company_pass`."""
    return getattr(_COMPANY, "on", False)


def needs_model(problem: AttributionProblem, method: str) -> nn.Module:
    """The problem's model, or a clear error where the problem was built without one."""
    if problem.model is None:
        raise ValueError(
            f"{method} reads the model's attention: it needs a problem built from a model "
            "(tokattr.attribute / tokattr.evaluate), not a bare target function"
        )
    return problem.model


def _configs(model: nn.Module) -> list[object]:
    """The model's config and its sub-configs (text / vision parts of composite models)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    subs = [getattr(config, k) for k in getattr(config, "sub_configs", {}) or {}]
    return [config, *[c for c in subs if c is not None]]


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation the model's config names (``eager``, ``sdpa``, ...)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with the model's attention computed eagerly (attention weights formed),
    restoring the implementation it had, on this instance only, after the block."""
    before = [(c, getattr(c, "_attn_implementation", None)) for c in _configs(model)]
    if attn_implementation(model) in (None, "eager"):
        yield
        return
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # older transformers: the config field is read at each forward
            for c, _ in before:
                c._attn_implementation = "eager"  # type: ignore[attr-defined]
        yield
    finally:
        for c, impl in before:
            c._attn_implementation = impl  # type: ignore[attr-defined]
        if hasattr(model, "set_attn_implementation") and before[0][1] is not None:
            model.set_attn_implementation(before[0][1])


def query_columns(problem: AttributionProblem) -> Tensor:
    """The column each row's first scored answer token is predicted from (the one before it):
    where attention-based scores are read. ``[batch]`` long"""
    mask = problem.inputs.score_mask.bool()
    cols = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, cols, mask.shape[1]).min(-1).values
    return first - 1


def run_model(problem: AttributionProblem, rows: Tensor, cols: slice, **kw: object) -> object:
    """The model on rows ``rows`` over columns ``cols`` (their embeddings),
    without a cache; ``kw`` go to the model's forward (``output_attentions=True``, ...). The
    pass is reported to the problem's ``count``."""
    model = needs_model(problem, "this method")
    x = problem.embeds[rows, cols]
    inputs = problem.inputs.select(rows, cols)
    if problem.count is not None:
        problem.count(inputs)
    return model(
        inputs_embeds=x,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=False,
        **kw,
    )


def check_layer(model: nn.Module, layer: int, method: str) -> None:
    """A clear error, before any pass, where ``layer`` is not one of the model's layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and not -n <= layer < n:
        raise ValueError(f"{method}: layer {layer} does not exist; the model has {n} layers")
