"""The engine behind the target functions: how target calls run fast.

- :mod:`~tokattr.engine.scoring` — teacher-forced answer log-probs, the one entry point.
- :mod:`~tokattr.engine.cache` — key/value-cache prefixes (:class:`Prefix`).
- :mod:`~tokattr.engine.packing` — packed tree passes (:class:`Branches`).
- :mod:`~tokattr.engine.tail` — the last-MLP cut on the scored columns.
- :mod:`~tokattr.engine.loo` — leave-one-out (occlusion and ``loo_kendall_tau``).
- :mod:`~tokattr.engine.coalitions` — coalitions re-run from where they differ from an
  earlier one (Kernel SHAP, Shapley sampling, exact Shapley, LIME, ContextCite, erasure
  curves).
- :mod:`~tokattr.engine.memory` — how many sequences a pass may hold.
- :mod:`~tokattr.engine.capabilities` — which of these a model supports, probed once.

Target functions (:mod:`tokattr.targets`) say *what* is scored; this package says how the
passes run. Methods reach it only through the target functions they are given.
"""

from tokattr.engine.cache import CACHE_KWARGS, Prefix, cache_kwarg, cache_states, prefix_cache
from tokattr.engine.packing import Branches, first_fit_trees, tree_sizes
from tokattr.engine.scoring import answer_log_probs
from tokattr.engine.tail import last_decoder_mlp, last_mlp_on_tail, tail_mlp

__all__ = [
    "CACHE_KWARGS",
    "Branches",
    "Prefix",
    "answer_log_probs",
    "cache_kwarg",
    "cache_states",
    "first_fit_trees",
    "last_decoder_mlp",
    "last_mlp_on_tail",
    "prefix_cache",
    "tail_mlp",
    "tree_sizes",
]
