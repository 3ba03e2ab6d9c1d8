"""AttnLRP and CP-LRP: layer-wise relevance propagation through a decoder, read as input x
gradient of a model whose backward pass follows the LRP rules.

The rules are those of the efficient (gradient x input) form of Achtibat et al. (2024), as
in their reference code (LXT): each rule changes only the backward pass of one operation, so
the forward values are the model's own and one forward + one backward pass gives the
relevance of every input embedding:

- **identity rule** on element-wise non-linearities (SiLU, GELU, ...): the relevance passes
  through unchanged, i.e. the local gradient is ``act(x) / x`` (:func:`identity_rule`);
- **normalisation** (RMSNorm, LayerNorm): the divisor (``rms`` / ``std``) is a constant, so
  the layer is linear for the backward pass (:func:`stop_gradient` on it);
- **uniform rule** on products of two inputs (the gate x up product of gated MLPs, and the two
  matrix products of attention): each factor gets an equal share; in gradient form the
  gradient after a product of ``k`` such shares is divided (:func:`divide_gradient`): values
  by 2, queries and keys by 4 (scores ``q k^T`` halved, then ``softmax(...) v`` halved);
- linear layers and the softmax keep their gradients (the epsilon rule with epsilon -> 0, and
  AttnLRP's softmax rule, in this form).

CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022) instead holds the attention weights constant (no gradient through
queries and keys) and the gates of gated MLPs too, which makes the backward graph linear in the
input: with a bias-free model and the logit as target, the relevances then add up to the logit
exactly (Euler's theorem for the resulting degree-1 homogeneous function), up to rounding.

:func:`lrp_rules` applies a variant's rules to one model *instance* inside a ``with`` block
(forwards of its norm and MLP modules replaced on the instance, forward hooks on its query /
key / value projections) and removes them after, also on error; no ``transformers`` class or
module is patched. The rules do not depend on the attention implementation (eager, SDPA): they
act on the projections' outputs, before any attention kernel.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

VARIANTS = ("attnlrp", "cp_lrp")


class _Identity(torch.autograd.Function):
    """Forward ``fn(x)``; backward: gradient times ``fn(x) / (x + eps)``."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[Tensor], Tensor], x: Tensor, eps: float) -> Tensor:
        out = fn(x)
        ctx.save_for_backward(out / (x + eps))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio, None


class _Divide(torch.autograd.Function):
    """Forward the identity; backward: gradient divided by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad / ctx.factor, None


def identity_rule(fn: Callable[[Tensor], Tensor], x: Tensor, eps: float = 1e-10) -> Tensor:
    """AttnLRP's identity rule (eq. 9) on an element-wise non-linearity: ``fn(x)``, whose
    input x gradient equals its output's relevance element by element."""
    return _Identity.apply(fn, x, eps)


def divide_gradient(x: Tensor, factor: float) -> Tensor:
    """AttnLRP's uniform rule (eq. 7) in gradient form: ``x``, its gradient divided."""
    return _Divide.apply(x, factor)


def stop_gradient(x: Tensor) -> Tensor:
    """No gradient (CP-LRP's constant attention weights; the norms' divisors)."""
    return x.detach()


# ------------------------------------------------------------------------------ module rules


def _rms_norm(self: nn.Module, x: Tensor) -> Tensor:
    dtype = x.dtype
    h = x.float()
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    h = h * stop_gradient(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    if getattr(self, "_tokattr_offset", False):  # Gemma: (1 + w), applied in float32
        return (h * (1.0 + self.weight.float())).to(dtype)
    return self.weight * h.to(dtype)


def _layer_norm(self: nn.LayerNorm, x: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / stop_gradient((var + self.eps).sqrt())
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _gated_mlp(variant: str) -> Callable[[nn.Module, Tensor], Tensor]:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if variant == "cp_lrp":
            return self.down_proj(self.act_fn(stop_gradient(gate)) * self.up_proj(x))
        product = identity_rule(self.act_fn, gate) * self.up_proj(x)
        return self.down_proj(divide_gradient(product, 2.0))

    return forward


def _plain_mlp(up: str, act: str, down: str) -> Callable[[nn.Module, Tensor], Tensor]:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        h = identity_rule(getattr(self, act), getattr(self, up)(x))
        out = getattr(self, down)(h)
        dropout = getattr(self, "dropout", None)
        return dropout(out) if isinstance(dropout, nn.Module) else out

    return forward


def _is_rms_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), Tensor)


def _mlp_rule(m: nn.Module, variant: str) -> Callable | None:
    if all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _gated_mlp(variant)  # Llama, Mistral, Qwen2, Gemma, ...
    if all(hasattr(m, k) for k in ("c_fc", "c_proj", "act")):
        return _plain_mlp("c_fc", "act", "c_proj")  # GPT-2
    if all(hasattr(m, k) for k in ("dense_h_to_4h", "dense_4h_to_h", "act")):
        return _plain_mlp("dense_h_to_4h", "act", "dense_4h_to_h")  # GPT-NeoX
    return None


def _qkv_hooks(layer: nn.Module, model: nn.Module, variant: str) -> list[tuple[nn.Module, Any]]:
    """``(projection, forward hook)`` pairs that apply the attention rules of ``variant`` to
    one decoder layer's queries, keys and values; empty where the layer has none we know."""
    q_scale, v_scale = (None, 1.0) if variant == "cp_lrp" else (4.0, 2.0)

    def scaled(factor: float | None) -> Callable[[Tensor], Tensor]:
        if factor is None:
            return stop_gradient
        return lambda t: t if factor == 1.0 else divide_gradient(t, factor)

    found = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules()}
    if all(k in found for k in ("q_proj", "k_proj", "v_proj")):
        return [
            (found["q_proj"], lambda m, a, o: scaled(q_scale)(o)),
            (found["k_proj"], lambda m, a, o: scaled(q_scale)(o)),
            (found["v_proj"], lambda m, a, o: scaled(v_scale)(o)),
        ]
    if "c_attn" in found:  # GPT-2: [q | k | v]

        def fused(m: nn.Module, a: tuple, o: Tensor) -> Tensor:
            q, k, v = o.split(o.shape[-1] // 3, dim=-1)
            return torch.cat([scaled(q_scale)(q), scaled(q_scale)(k), scaled(v_scale)(v)], -1)

        return [(found["c_attn"], fused)]
    if "query_key_value" in found:  # GPT-NeoX: per head [q k v]
        heads = model.config.num_attention_heads

        def interleaved(m: nn.Module, a: tuple, o: Tensor) -> Tensor:
            view = o.view(*o.shape[:-1], heads, 3, o.shape[-1] // (3 * heads))
            q, k, v = view.unbind(-2)
            parts = [scaled(q_scale)(q), scaled(q_scale)(k), scaled(v_scale)(v)]
            return torch.stack(parts, dim=-2).view_as(o)

        return [(found["query_key_value"], interleaved)]
    return []


def check_family(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers where every one has attention projections and an MLP with
    rules; otherwise a clear error naming the family (nothing is changed)."""
    from tokattr.methods.value_zeroing import decoder_layers

    name = type(model).__name__
    try:
        layers = list(decoder_layers(model))
    except ValueError:
        raise ValueError(f"attnlrp has no rules for {name}: no list of decoder layers") from None
    for layer in layers:
        if not _qkv_hooks(layer, model, "attnlrp"):
            raise ValueError(
                f"attnlrp has no rules for {name}: its attention has no q_proj/k_proj/v_proj, "
                "GPT-2 c_attn or GPT-NeoX query_key_value"
            )
        if not any(_mlp_rule(m, "attnlrp") for m in layer.modules()):
            raise ValueError(f"attnlrp has no rules for {name}: no MLP of a known form")
    return layers


@contextlib.contextmanager
def lrp_rules(model: nn.Module, variant: str = "attnlrp") -> Iterator[None]:
    """Within the block, ``model``'s backward pass follows the LRP rules of ``variant``
    (``"attnlrp"`` or ``"cp_lrp"``); forwards give the same values. Instance-level only, and
    undone on exit, also on error. A family without rules: a ``ValueError`` before any
    change."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LRP variant {variant!r}; choose from {VARIANTS}")
    layers = check_family(model)
    # (module, attribute, its own instance value or None). Under an Accelerate hook
    # (device_map, offloading) the hook's wrapper stays `forward` and calls `_old_forward`,
    # so the rule goes there: the hook still brings the offloaded weights in first.
    patched: list[tuple[nn.Module, str, object]] = []
    handles = []
    try:
        for m in model.modules():
            rule: Callable | None = None
            if isinstance(m, nn.LayerNorm):
                rule = _layer_norm
            elif _is_rms_norm(m):
                rule = _rms_norm
                if type(m).__name__.startswith("Gemma"):
                    m._tokattr_offset = True  # type: ignore[assignment]
            else:
                rule = _mlp_rule(m, variant)
            if rule is not None:
                slot = "_old_forward" if "_hf_hook" in vars(m) else "forward"
                patched.append((m, slot, vars(m).get(slot)))
                setattr(m, slot, types.MethodType(rule, m))
        for layer in layers:
            for proj, hook in _qkv_hooks(layer, model, variant):
                handles.append(proj.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, slot, own in reversed(patched):
            if own is None:
                delattr(m, slot)
            else:
                setattr(m, slot, own)
            vars(m).pop("_tokattr_offset", None)
