"""Key/value-cache prefixes: the first columns of a sequence computed once, reused by every
perturbation that leaves them unchanged, and the name a model's ``forward`` takes its cache by."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache


@dataclass(frozen=True)
class Prefix:
    """Key/value states of the first ``offset`` columns, already computed: a target called with
    ``past=Prefix(cache, offset)`` runs the model on columns ``offset ..`` only (the earlier
    columns of ``embeds`` must be the ones the cache was computed from). The call appends the
    new columns' states to ``cache``, so ``Prefix(DynamicCache(), 0)`` fills an empty cache
    with the whole sequence's states."""

    cache: Cache
    offset: int


def prefix_cache(
    states: Sequence[tuple[Tensor, Tensor]], rows: Tensor, offset: int, start: int = 0
) -> Cache:
    """A fresh cache holding columns ``start .. offset - 1`` of ``states`` (per layer, keys and
    values ``[batch, heads, seq, head_dim]``) for the rows ``rows`` (an index tensor)."""
    return DynamicCache(
        ddp_cache_data=[(k[rows, :, start:offset], v[rows, :, start:offset]) for k, v in states]
    )


def cache_states(cache: Cache) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the keys and values a cache holds."""
    return [(layer.keys, layer.values) for layer in cache.layers]


CACHE_KWARGS = ("cache", "past_key_values")
"""The names a causal LM's ``forward`` takes its key/value cache by, newest first: transformers
5.24 renamed ``past_key_values=`` to ``cache=`` (the old name still works there, with a
``FutureWarning``); earlier releases, and models written against them, take only
``past_key_values=``."""


@functools.cache
def cache_kwarg(model_type: type) -> str | None:
    """The keyword ``model_type.forward`` takes a key/value cache by (one of
    :data:`CACHE_KWARGS`, the newest it declares), or ``None`` if it takes neither.

    Read once per class from the signature (``inspect.signature`` follows the
    ``functools.wraps`` of transformers' deprecation decorators to the real parameters), so a
    model is called with the spelling its own release expects, never the deprecated one. A
    ``forward`` that declares neither but takes ``**kwargs`` (a subclass that adds to its
    parent's and passes the rest on) is read through to the next class's ``forward``.
    """
    for cls in model_type.__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        params = inspect.signature(forward).parameters
        name = next((n for n in CACHE_KWARGS if n in params), None)
        if name is not None or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return name
    return None
