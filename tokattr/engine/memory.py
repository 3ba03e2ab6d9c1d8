"""How many sequences go through the model per pass: sized to a memory budget.

Attribution runs many sequences of one length (IG steps, perturbations) through the model. The
most that fit is ``budget // bytes_per_sequence``; the per-sequence cost is estimated from the
model's config (hidden size, layers, MLP width, heads, vocabulary), not measured, and errs on
the large side. On a GPU the default budget is 60% of the free device memory, and a pass that
runs out of memory anyway is retried at half the size
(:func:`tokattr.methods.problem.chunked`). On a CPU passes are also capped at
:data:`CPU_TOKENS_PER_PASS` tokens: past a thousand or so tokens a pass, larger passes run
slower per sequence on a CPU (the measurements are in ``docs/performance.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

GiB = 1024**3
CPU_TOKENS_PER_PASS = 1024
"""Most tokens (sequences x length) per pass on a CPU when the batch size is automatic."""
MAX_SEQUENCES_PER_PASS = 4096
"""Most sequences per pass on any device when the batch size is automatic."""


def _config_value(config: object, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from a model's config."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    bytes_per_value: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config
        hidden = _config_value(config, "hidden_size", "n_embd", "d_model", default=1024)
        return cls(
            hidden=hidden,
            layers=_config_value(config, "num_hidden_layers", "n_layer", "num_layers", default=24),
            intermediate=_config_value(
                config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden
            ),
            heads=_config_value(config, "num_attention_heads", "n_head", default=16),
            vocab=_config_value(config, "vocab_size", default=50_000),
            bytes_per_value=next(model.parameters()).element_size(),
        )


def bytes_per_sequence(shape: ModelShape, seq: int, grad: bool, scored: int | None = None) -> int:
    """Estimated peak memory one sequence of ``seq`` tokens adds to a pass, in bytes.

    Without gradients, one layer's working set is alive at a time (hidden states, the MLP's
    three ``intermediate``-wide activations, an attention score matrix); with gradients every
    layer keeps what its backward pass needs (about 12 hidden-sized and 4 MLP-sized values per
    token, and the attention probabilities), plus the gradient of the input embeddings.
    ``scored`` columns of float32 logits (and their log-softmax) come on top (default: all).
    """
    h, i, b = shape.hidden, shape.intermediate, shape.bytes_per_value
    attention = shape.heads * seq * b  # one row of scores per head, per token
    if grad:
        per_token = shape.layers * ((12 * h + 4 * i) * b + 2 * attention) + 4 * h * b
    else:
        per_token = (6 * h + 3 * i) * b + 2 * attention
    logits = 2 * 4 * shape.vocab * (seq if scored is None else min(scored, seq))
    return seq * per_token + logits


def packed_rows_per_pass(
    shape: ModelShape, batch_size: int, seq: int, scored: int, width: int, keep: int
) -> int:
    """How many packed sequences of ``width`` tokens (``keep`` of them scored, plus a
    ``width x width`` attention mask) go in one pass so that it uses no more memory than
    ``batch_size`` sequences of ``seq`` tokens (``scored`` of them scored) would, by
    :func:`bytes_per_sequence`; 0 where not even one fits."""
    full = batch_size * bytes_per_sequence(shape, seq, False, scored)
    packed = bytes_per_sequence(shape, width, False, keep) + width * width * shape.bytes_per_value
    return full // packed


def default_budget(device: torch.device) -> int:
    """60% of the free memory on a CUDA device; on a CPU a quarter of the available RAM, at
    most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 * GiB
    return int(min(0.25 * available, 4 * GiB))


def sequences_per_pass(
    model: nn.Module,
    seq: int,
    grad: bool,
    budget: int | None = None,
    scored: int | None = None,
) -> int:
    """The most sequences of ``seq`` tokens per forward (``grad``: forward + backward) pass
    that fit ``budget`` bytes (default :func:`default_budget`), at least 1."""
    device = next(model.parameters()).device
    budget = default_budget(device) if budget is None else budget
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
    n = budget // bytes_per_sequence(ModelShape.of(model), seq, grad, scored)
    if device.type != "cuda":
        n = min(n, CPU_TOKENS_PER_PASS // max(seq, 1))
    return int(max(1, min(n, MAX_SEQUENCES_PER_PASS)))


STATES_BUDGET = 1 << 29
"""Most bytes of key/value states held at once on a CPU (:func:`states_budget`), and the budget
of a problem that sets none."""

STATES_SHARE = 4
"""The held states' share of the memory budget, as its divisor (:func:`states_budget`): a
quarter for the parents kept between two waves of coalitions and a quarter for one pass's
cached columns (:mod:`tokattr.engine.coalitions`), the pass's own activations sized to the
budget as before."""


def states_budget(device: torch.device, budget: int | None = None) -> int:
    """Bytes of key/value states the prefix-sharing passes may hold at once: the parents' kept
    between two waves (a coalition whose parent's states would not fit takes a trunk as parent
    instead), and, separately, those of one pass (each sequence's cached and new columns: a pass
    holds no more sequences than fit). A :data:`STATES_SHARE` share of ``budget`` (default
    :func:`default_budget`: on a GPU 60% of its free memory), and on a CPU at most
    :data:`STATES_BUDGET`: as for full passes (:data:`CPU_TOKENS_PER_PASS`), wider passes do not
    run faster per token there, they only hold more memory."""
    budget = default_budget(device) if budget is None else budget
    share = max(1, budget // STATES_SHARE)
    return share if device.type == "cuda" else min(STATES_BUDGET, share)
