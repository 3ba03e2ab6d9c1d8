"""Value zeroing: how much each layer's output at one token changes when another token's value
vectors are zeroed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from tokattr.methods.internals import check_layer, in_company_pass, needs_model, query_columns
from tokattr.methods.problem import AttributionProblem, Method, MethodOutput, chunked

ZeroFn = Callable[[Tensor, Tensor], Tensor]
"""``(projection output [copies, seq, width], token per copy [copies]) -> output`` with that
token's value vectors zeroed in each copy."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the ``ModuleList`` with one entry per hidden layer."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"value_zeroing: cannot find the decoder layers of {type(model).__name__}")


def _zero_slice(start: Callable[[int], int], stop: Callable[[int], int]) -> ZeroFn:
    def zero(out: Tensor, token: Tensor) -> Tensor:
        out = out.clone()
        copies = torch.arange(len(token), device=out.device)
        width = out.shape[-1]
        out[copies, token, start(width) : stop(width)] = 0.0
        return out

    return zero


def _zero_neox(heads: int) -> ZeroFn:
    def zero(out: Tensor, token: Tensor) -> Tensor:
        c, s, width = out.shape
        view = out.clone().view(c, s, heads, 3, width // (3 * heads))  # per head: q, k, v
        view[torch.arange(c, device=out.device), token, :, 2] = 0.0
        return view.view(c, s, width)

    return zero


def value_projection(layer: nn.Module, model: nn.Module) -> tuple[nn.Module, ZeroFn]:
    """The module that outputs a decoder layer's value vectors, and how to zero one token's in
    its output: ``v_proj`` (Llama, Mistral, Qwen2, Gemma, Phi-3 ...), GPT-2's fused ``c_attn``
    (values are its last third), GPT-NeoX's fused ``query_key_value`` (per head ``q, k, v``).
    Any other family: a clear error naming it."""
    for name, module in layer.named_modules():
        if name.endswith("v_proj"):
            return module, _zero_slice(lambda w: 0, lambda w: w)
        if name.endswith("attn.c_attn"):
            return module, _zero_slice(lambda w: 2 * w // 3, lambda w: w)
        if name.endswith("attention.query_key_value"):
            return module, _zero_neox(model.config.num_attention_heads)
    raise ValueError(
        f"value_zeroing has no rule for {type(model).__name__}: no v_proj, GPT-2 c_attn or "
        "GPT-NeoX query_key_value in its decoder layers"
    )


def _expand(value: object, n: int) -> object:
    """A captured layer argument of one sequence, repeated for ``n`` copies (tensors of two or
    more dimensions whose batch is 1; tuples element-wise; anything else as it is)."""
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, n) for v in value)
    return value


def _hidden(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value,index]


def value_zeroing_matrices(
    problem: AttributionProblem, row: int, batch_size: int
) -> tuple[list[Tensor], slice]:
    """Row ``row``'s value-zeroing matrix of every layer, ``C[i, j] = 1 - cos(h_i, h_i^{-j})``
    with ``h`` the layer's output and ``h^{-j}`` the same layer's output, from the same input,
    with token ``j``'s value vectors zeroed in every head (Mohebbi et al. 2023, eq. 3), over
    the row's attended columns ``cols``: per layer ``[len(cols), len(cols)]`` float32."""
    model = needs_model(problem, "value_zeroing")
    layers = decoder_layers(model)
    r = torch.tensor([row], device=problem.embeds.device)
    cols = problem.trim(r)
    inputs = problem.inputs.select(r, cols)
    captured: list[tuple[tuple, dict, Tensor]] = []
    hooks = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not in_company_pass():  # not a sharded model's pass beside another rank's
            captured.append((args, kwargs, None))  # type: ignore[arg-type]

    def post(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if in_company_pass():
            return
        a, k, _ = captured[-1]
        captured[-1] = (a, k, _hidden(out).detach())

    try:
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(layer.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            model(
                inputs_embeds=problem.embeds[r, cols],
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
            )
    finally:
        for h in hooks:
            h.remove()
    if problem.count is not None:
        problem.count(inputs)
    n = cols.stop - cols.start
    keep = inputs.attention_mask[0].bool()
    tokens = keep.nonzero()[:, 0]  # the attended columns (left padding is never attended)
    out = []
    for layer, (args, kwargs, h) in zip(layers, captured, strict=True):
        module, zero = value_projection(layer, model)
        matrix = torch.zeros(n, n, device=h.device)

        def run(i: int, j: int, layer=layer, args=args, kwargs=kwargs, h=h, module=module,
                zero=zero, matrix=matrix) -> None:  # fmt: skip
            token = tokens[i:j]
            hook = module.register_forward_hook(lambda m, a, o: zero(o, token))
            try:
                with torch.no_grad():
                    altered = _hidden(
                        layer(
                            *(_expand(a, len(token)) for a in args),
                            **{k: _expand(v, len(token)) for k, v in kwargs.items()},
                        )
                    )
            finally:
                hook.remove()
            if problem.count is not None:
                problem.count(inputs.select(torch.zeros(len(token), dtype=torch.long)))
            cos = torch.nn.functional.cosine_similarity(
                altered.float(), h.float().expand_as(altered), dim=-1
            )  # [copies, seq]
            matrix[:, token] = (1 - cos).T

        chunked(len(tokens), batch_size, run)
        matrix[~keep] = 0.0
        matrix[:, ~keep] = 0.0
        out.append(matrix)
    return out, cols


class ValueZeroing(Method):
    """Value zeroing: Mohebbi, Zuidema, Chrupała & Alishahi, "Quantifying Context Mixing in
    Transformers", EACL 2023.

    For each layer and each attended token ``j``, token ``j``'s value vectors are set to zero
    in every head and the layer is re-run on its unchanged input; ``C[i, j]`` is the cosine
    distance between each token's original and altered layer output. ``layer=None``
    (default): the matrices, each row normalised to sum 1, are rolled out through the layers
    (``C_L ... C_1``, the paper's aggregation; no identity is added, as each layer's output
    already holds its residual stream); an integer reads that one layer's ``C`` unnormalised.
    The score of a feature token is the entry at the column that predicts the first answer
    token (as :class:`~tokattr.methods.attention.Attention`).

    Cost: one forward per row to capture each layer's input, then per layer one decoder-layer
    call per attended token, ``batch_size`` copies per call (a layer call is counted as a
    sequence in ``model_evals``). Families with a rule: those with a ``v_proj`` (Llama,
    Mistral, Qwen2, ...), GPT-2 and GPT-NeoX; others get a clear error.

    Args:
        layer: ``None`` for the rollout over all layers, or the layer to read (``-1``: last).
    """

    def __init__(self, layer: int | None = None) -> None:
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ValueError(f"value_zeroing: layer must be an integer or None, got {layer!r}")
        self.layer = layer

    def attribute(self, problem: AttributionProblem) -> MethodOutput:
        if self.layer is not None:
            check_layer(needs_model(problem, "value_zeroing"), self.layer, "value_zeroing")
        q = query_columns(problem).tolist()
        scores = torch.zeros(problem.feature_mask.shape, dtype=torch.float32)
        for row in range(problem.n_rows):
            matrices, cols = value_zeroing_matrices(problem, row, problem.batch_size)
            if self.layer is None:
                mixed = None
                for c in matrices:
                    c = c / c.sum(-1, keepdim=True).clamp(min=1e-12)
                    mixed = c if mixed is None else c @ mixed
                chosen = mixed
            else:
                chosen = matrices[self.layer]
            scores[row, cols] = chosen[q[row] - cols.start].float().cpu()  # type: ignore[index]
        scores = scores.to(problem.embeds.device)
        return MethodOutput(torch.where(problem.feature_mask, scores, torch.zeros_like(scores)))
