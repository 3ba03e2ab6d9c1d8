"""Activation checkpointing of a model's decoder layers, inside a ``with`` block.

A gradient method keeps every layer's activations for its backward pass: on a 4,096-token
prompt of a 100M-parameter Llama that is several GiB for one sequence, more than a memory
budget of a few GiB allows, and a single sequence cannot be split further. Checkpointing
(Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016; ``torch.utils.checkpoint``)
keeps only each decoder layer's input and recomputes the layer during the backward pass: one
more forward pass of compute for a peak of one layer's activations plus the layers' inputs.

Transformers' own ``gradient_checkpointing_enable`` acts only in training mode (and flips
the model's configuration); :func:`checkpointed` instead wraps the ``forward`` of each decoder
layer of the instance, in eval mode, and puts back exactly what was there (an instance
``forward`` set by Accelerate's hooks included) when the block ends, also on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokattr.engine.memory import ModelShape, bytes_per_sequence

_MISSING = object()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules whose class the model names as never split
    (``_no_split_modules``, e.g. ``LlamaDecoderLayer``, ``GPT2Block``).

    Raises:
        ValueError: the model names none, or none of them is in it.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules), so its "
            "layers cannot be checkpointed; pass gradient_checkpointing=False"
        )
    return layers


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every decoder layer of ``model`` but the last keeps only its input
    for the backward pass and recomputes itself there (``use_reentrant=False``); passes
    without gradients run as before. The last layer is left as it is: its MLP may run on the
    scored columns only (:mod:`tokattr.engine.tail`, a cut that is set for the forward pass
    and would not be there for the recomputation), and it is one layer of many. The layers'
    ``forward`` attributes are restored on exit."""
    layers = decoder_layers(model)[:-1]
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward", _MISSING)))
            inner = layer.forward  # the instance's (e.g. Accelerate's hook) or the class's

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward = forward  # type: ignore[method-assign]
        yield model
    finally:
        for layer, previous in saved:
            if previous is _MISSING:
                del layer.forward
            else:
                layer.forward = previous  # type: ignore[method-assign]


def needs_checkpointing(model: nn.Module, seq: int, budget: int, scored: int | None) -> bool:
    """Whether one sequence of ``seq`` tokens (``scored`` of them scored), forward and
    backward, is estimated to need more than ``budget`` bytes
    (:func:`tokattr.engine.memory.bytes_per_sequence`)."""
    shape = ModelShape.of(model)
    return bytes_per_sequence(shape, seq, True, scored) > budget
