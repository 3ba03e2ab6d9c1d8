"""tokattr: a benchmark suite for token attribution on causal language models.

The core (this package's top level) needs no Lightning and no W&B: ``import tokattr``
imports neither. The Lightning layer (``tokattr.lightning``) and the CLI (``tokattr.cli``) do.

The public names below are loaded on first use (PEP 562), so that reading a finished run
(:mod:`tokattr.results`, :mod:`tokattr.report`) imports no model code: no transformers, no
methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokattr._lazy import lazy_exports

if TYPE_CHECKING:
    from tokattr.attribution import Attribution, attribute
    from tokattr.evaluation import evaluate
    from tokattr.methods import METHODS
    from tokattr.metrics import METRICS
    from tokattr.models import BUNDLED, LanguageModel, ModelNotFoundError, load_model
    from tokattr.table import EvaluationTable

__version__ = "0.1.0"

_MODULES = {
    "tokattr.attribution": ("Attribution", "attribute"),
    "tokattr.evaluation": ("evaluate",),
    "tokattr.table": ("EvaluationTable",),
    "tokattr.methods": ("METHODS",),
    "tokattr.metrics": ("METRICS",),
    "tokattr.models": ("BUNDLED", "LanguageModel", "ModelNotFoundError", "load_model"),
}
__all__ = [  # what the type checker sees above, loaded on first use below
    "BUNDLED",
    "METHODS",
    "METRICS",
    "Attribution",
    "EvaluationTable",
    "LanguageModel",
    "ModelNotFoundError",
    "__version__",
    "attribute",
    "evaluate",
    "load_model",
]
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
