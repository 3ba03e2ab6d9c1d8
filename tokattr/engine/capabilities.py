"""What a model can do fast, probed once per model and cached here: key/value-cache prefixes
and packed tree passes (:func:`supports_prefix`, :func:`supports_branches`)."""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch

from tokattr.engine.cache import cache_kwarg
from tokattr.engine.packing import Branches
from tokattr.engine.scoring import answer_log_probs
from tokattr.targets import takes_fast_paths

if TYPE_CHECKING:
    from tokattr.models import LanguageModel
    from tokattr.targets import TargetFunction


def supports_prefix(lm: LanguageModel, fn: TargetFunction) -> bool:
    """Whether ``fn`` on this model can start from a key/value cache of the first columns
    (:class:`~tokattr.engine.cache.Prefix`): a target that takes ``past=`` and ``branches=``
    (:func:`~tokattr.targets.takes_fast_paths`: the built-ins but ``contrast``), on a
    decoder-only model whose ``forward`` takes a key/value cache (by either name,
    :func:`~tokattr.engine.cache.cache_kwarg`), a standard cache and full attention in every layer
    (sliding-window and recurrent layers are left to full passes)."""
    model, config = lm.model, lm.model.config
    if not takes_fast_paths(fn) or getattr(config, "is_encoder_decoder", False):
        return False
    if cache_kwarg(type(model)) is None:  # its forward takes no cache= / past_key_values=
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    if layer_types is None and sliding:
        return False
    check = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(check):
        return bool(check())
    return bool(getattr(model, "_supports_cache_class", False))


_BRANCHES_OK: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def supports_branches(lm: LanguageModel, fn: TargetFunction) -> bool:
    """Whether ``fn`` on this model can score packed trees
    (:class:`~tokattr.engine.packing.Branches`): where :func:`supports_prefix` holds, with
    eager or SDPA attention (which take a custom 4-D mask), and where a probe
    (:func:`_packs_exactly`, run once per model) gives the same log-probs packed as apart. A
    model that rejects a 4-D mask, or visibly mixes the packed sequences (a mask or position
    ids it does not honour), gets key/value-cache passes instead of wrong scores."""
    if not supports_prefix(lm, fn):
        return False
    if getattr(lm.model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    if lm.model not in _BRANCHES_OK:
        try:
            _BRANCHES_OK[lm.model] = _packs_exactly(lm.model)
        except Exception as err:  # e.g. ALiBi models that build their bias from a 2-D mask
            warnings.warn(
                f"packed occlusion passes are off for this model ({type(err).__name__}: "
                f"{err}); occlusion uses key/value-cache passes",
                RuntimeWarning,
                stacklevel=2,
            )
            _BRANCHES_OK[lm.model] = False
    return _BRANCHES_OK[lm.model]


PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Largest log-prob difference (nats) between packed and separate passes that the probe takes
for rounding; other dtypes (half precision): 5e-2."""


@torch.no_grad()
def _packs_exactly(model: torch.nn.Module) -> bool:
    """An 8-token sequence of mid-vocabulary tokens and a copy of it that differs from column 2
    on, scored on their last 5 tokens: packed (one sequence, custom mask, position ids) and
    apart must agree to :data:`PROBE_TOLERANCE`, and, where moving the later tokens' position
    ids changes the scores, to a tenth of that change (so a model that only weakly mixes up
    positions is caught in half precision too)."""
    device = next(model.parameters()).device
    embedding = model.get_input_embeddings()
    vocab = embedding.num_embeddings
    ids = ((vocab // 2 + 7 * torch.arange(8, device=device)) % vocab)[None]  # [1, 8]
    x = embedding(ids)  # [1, 8, d_model]
    branch = x.clone()
    branch[0, 2] = 0.0
    ids2 = ids.expand(2, -1)  # the sequence and its copy, apart
    mask2 = torch.ones_like(ids2)
    positions = torch.arange(8, device=device).expand(2, -1)
    score = torch.zeros(2, 8, dtype=torch.bool, device=device)
    score[:, 3:] = True
    both = torch.cat([x, branch])
    apart = answer_log_probs(model, both, mask2, positions, ids2, score)
    row = torch.zeros(1, dtype=torch.long, device=device)
    together = answer_log_probs(
        model, x, mask2[:1], positions[:1], ids, score[:1], branches=Branches(row, row + 2, branch)
    )
    moved_positions = torch.where(positions >= 4, positions + 3, positions)  # a gap after 3
    moved = answer_log_probs(model, both, mask2, moved_positions, ids2, score)
    err = float((together - apart).abs().max())
    shift = float((moved - apart).abs().max())
    tol = PROBE_TOLERANCE.get(x.dtype, 5e-2)
    return err <= tol and (shift <= tol or err <= 0.1 * shift)
