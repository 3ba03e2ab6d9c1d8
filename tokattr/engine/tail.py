"""The last-MLP cut: a pass whose logits are read on its last columns only runs the last
decoder layer's MLP on those columns (probed once per model)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def last_mlp_on_tail(model: nn.Module, width: int, keep: int) -> Iterator[None]:
    """Within the block, the next forward over ``width`` columns, of which only the last
    ``keep`` are read (their logits), runs its last decoder layer's MLP on those ``keep``
    columns only.

    The other columns' last-layer outputs reach nothing that is read: no later layer attends
    to them, and their logits are not kept. The last layer's attention still reads every
    column's keys and values (computed before the MLP), so the kept columns' logits are those
    of the full pass up to floating-point rounding (the MLP works token by token; its matrix
    products then run on fewer rows), while a pass whose scored answer covers a third of the
    columns skips its last MLP on the other two thirds. Models where a probe (:func:`tail_mlp`,
    once per model) does not confirm this, and models in training mode, run the whole pass.

    Only the first call of the MLP in the block, on this thread, from the innermost such block
    is cut; other forward hooks on that MLP see its ``[batch, keep, d]`` output."""
    mlp = tail_mlp(model) if keep < width and not model.training else None
    if mlp is None:
        yield
        return
    with _TailOnly(mlp, width, keep):
        yield


class _TailOnly:
    """Hooks on an MLP that run its next call on the last ``keep`` of ``width`` columns and
    give zeros on the others; an input of another shape runs whole. Active on the entering
    thread, innermost block first."""

    _active = threading.local()  # .blocks: {id(mlp): the innermost _TailOnly on it}

    def __init__(self, mlp: nn.Module, width: int, keep: int) -> None:
        self.mlp, self.width, self.keep = mlp, width, keep
        self.cuts = 0  # calls cut to the tail (at most 1)
        self._cut = False

    def __enter__(self) -> _TailOnly:
        blocks = self._blocks()
        self._outer = blocks.get(id(self.mlp))
        blocks[id(self.mlp)] = self
        self.handles = [
            self.mlp.register_forward_pre_hook(self._before),
            self.mlp.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        blocks = self._blocks()
        if self._outer is None:
            blocks.pop(id(self.mlp), None)
        else:
            blocks[id(self.mlp)] = self._outer

    @classmethod
    def _blocks(cls) -> dict[int, _TailOnly]:
        if not hasattr(cls._active, "blocks"):
            cls._active.blocks = {}
        return cls._active.blocks

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        self._cut = (
            self.cuts == 0
            and self._blocks().get(id(self.mlp)) is self
            and isinstance(x, Tensor)
            and x.dim() == 3
            and x.shape[1] == self.width
        )
        if not self._cut:
            return None
        assert isinstance(x, Tensor)
        return (x[:, -self.keep :].contiguous(), *args[1:])  # contiguous: GPT-2's Conv1D views

    def _after(self, module: nn.Module, args: tuple, out: object) -> Tensor | None:
        if not self._cut:
            return None
        self._cut = False
        if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[1] == self.keep):
            raise RuntimeError(f"the last MLP gave {type(out).__name__}, not [batch, keep, d]")
        self.cuts += 1
        return F.pad(out, (0, 0, self.width - self.keep, 0))  # zeros where nothing reads


def last_decoder_mlp(model: nn.Module) -> nn.Module | None:
    """The MLP (child ``mlp``) of the last block of the model's list of
    ``config.num_hidden_layers`` decoder layers, or ``None``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            mlp = getattr(module[-1], "mlp", None)
            if isinstance(mlp, nn.Module):
                return mlp
    return None


_TAIL_MLP: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()

TAIL_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Largest difference, relative to the largest logit, between a full pass and one whose last
MLP runs on the tail only that the probe takes for rounding; other dtypes: 1e-2."""


def tail_mlp(model: nn.Module) -> nn.Module | None:
    """The last decoder MLP where running it on the last columns only leaves their logits as
    they are (:func:`last_mlp_on_tail`), probed once per model on two 8-token sequences (last
    3 columns kept): a module that mixes tokens, takes or returns anything but
    ``[batch, seq, d]``, or fails (with a warning), is left alone. ``None``: run it whole."""
    if model not in _TAIL_MLP:
        mlp = last_decoder_mlp(model)
        if mlp is not None:
            try:
                mlp = mlp if _tail_probe(model, mlp) else None
            except torch.OutOfMemoryError:
                return None  # not cached: the next pass probes again
            except Exception as err:
                warnings.warn(
                    f"passes run their last MLP on every column for this model (the probe "
                    f"failed: {type(err).__name__}: {err})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                mlp = None
        _TAIL_MLP[model] = mlp
    return _TAIL_MLP[model]


@torch.no_grad()
def _tail_probe(model: nn.Module, mlp: nn.Module) -> bool:
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    vocab = embedding.num_embeddings
    start = torch.tensor([[vocab // 3], [vocab // 2]], device=device)
    ids = (start + 5 * torch.arange(8, device=device)) % vocab  # [2, 8]
    x = embedding(ids)
    positions = torch.arange(8, device=device).expand(2, -1)
    mask = torch.ones_like(ids)
    full = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    with _TailOnly(mlp, 8, 3) as hooks:
        tail = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
    if hooks.cuts != 1:
        return False
    a, b = full.logits[:, -3:].double(), tail.logits[:, -3:].double()
    tol = TAIL_PROBE_TOLERANCE.get(x.dtype, 1e-2)
    return bool((a - b).abs().max() <= tol * a.abs().max().clamp(min=1.0))


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters
