"""Models sharded over processes (FSDP2), with every rank's forward passes in lockstep.

FSDP2 (``torch.distributed.fsdp.fully_shard``, through Lightning's ``ModelParallelStrategy``)
keeps a shard of each decoder layer's weights on every rank of the data-parallel group and
all-gathers a layer's weights when it runs (Zhao et al., "PyTorch FSDP", VLDB 2023). Ranks
still take different prompts. Two things follow for attribution:

- **Only the decoder layers are sharded.** Methods read input embeddings outside the model's
  forward (the target function's input is the embeddings), which FSDP2 refuses for a sharded
  embedding (a Tensor / DTensor mix); the embeddings, the final norm and the head stay whole
  on every rank, a small share of a large model's weights.
- **Every rank must run the same passes, in the same order**, since each forward all-gathers
  every layer's weights in turn on all of them, and so does each backward (in reverse), but a
  method's passes depend on its data (prompt lengths, features, chunking, prefix reuse).
  :class:`Lockstep` makes each pass a round of voting: a rank about to run a forward votes its
  kind (1: forward only; 2: a forward whose input embeddings need a gradient, so a backward
  follows before the next forward), and the round runs the highest kind voted. A rank whose
  own pass is of a lower kind, or that has nothing left to run (:meth:`Lockstep.drain`, once,
  at the end of its run), runs a one-token dummy pass of that kind beside it and votes again.
  All ranks leave ``drain`` together once every vote is 0; nothing between the passes may be
  another collective. A target function
  that runs several forwards before one backward (the contrast target) would break the
  pairing, and is refused with a sharded model.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def shard_layers(model: nn.Module, mesh: Any) -> int:
    """``fully_shard`` every decoder layer of ``model`` (the classes it lists in
    ``_no_split_modules``, as ``device_map`` does) over the 1-D device ``mesh``; the number
    of layers sharded.

    Raises:
        ValueError: the model names no layer classes, or none of them is in it.
    """
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer classes (_no_split_modules), so "
            "tokattr cannot tell what to shard; run it unsharded or with a device_map"
        )
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no module of its layer classes {names}")
    for p in model.parameters():
        p.requires_grad_(False)  # attribution needs input gradients only
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return len(layers)


class Lockstep:
    """Keeps every rank's forward passes of one sharded model in step (module docstring).

    Use as a context manager around a run: within it, ``model``'s forward (an instance
    attribute, removed on exit) votes before each pass. Call :meth:`drain` once, when this
    rank has no pass left to run, before any other collective.
    """

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        self.model = model
        self.group = group
        self.passes = 0  # this rank's own passes
        self.dummies = 0  # passes run to keep another rank company
        self._own: Any = None  # the model's own instance forward, if it had one

    def _vote(self, kind: int) -> int:
        """This rank's pass kind in, the round's kind (the highest voted) out."""
        import torch.distributed as dist

        device = self.model.get_input_embeddings().weight.device
        t = torch.tensor([kind], device=device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _dummy(self, kind: int) -> None:
        """A one-token pass of ``kind``, to run the round's collectives beside another rank."""
        model = self.model
        emb = model.get_input_embeddings()
        # A gradient pass even where this rank's own pass runs in inference mode (the
        # coalition and occlusion passes do).
        from tokattr.methods.internals import company_pass

        with company_pass(), torch.inference_mode(False), torch.set_grad_enabled(kind == 2):
            token = torch.zeros(1, 1, dtype=torch.long, device=emb.weight.device)
            x = emb(token).detach().requires_grad_(kind == 2)
            out = type(model).forward(model, inputs_embeds=x, use_cache=False)
            if kind == 2:
                torch.autograd.grad(out.logits.float().sum(), x)
        self.dummies += 1

    def __enter__(self) -> Lockstep:
        """From here, each forward of ``model`` waits for its round (an instance attribute,
        removed by ``__exit__``, also on error)."""
        model = self.model
        self._own = vars(model).get("forward")
        inner = self._own or types.MethodType(type(model).forward, model)

        def forward(this: nn.Module, *args: Any, **kwargs: Any) -> Any:
            x = kwargs.get("inputs_embeds")
            kind = 2 if torch.is_grad_enabled() and x is not None and x.requires_grad else 1
            while (top := self._vote(kind)) > kind:
                self._dummy(top)
            self.passes += 1
            return inner(*args, **kwargs)

        model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is None:
            del self.model.forward
        else:
            self.model.forward = self._own  # type: ignore[method-assign]

    def drain(self) -> None:
        """Vote "done" and run dummy passes while any other rank still runs its own; returns
        on every rank at once, when all are done."""
        while (top := self._vote(0)) > 0:
            self._dummy(top)
