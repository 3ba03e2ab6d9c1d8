"""tokattr: a benchmark suite for token attribution on causal language models.

The core (this package's top level) needs no Lightning and no W&B: ``import tokattr``
imports neither. The Lightning layer (``tokattr.lightning``) and the CLI (``tokattr.cli``) do.

The public names below are loaded on first use (PEP 562), so that reading a finished run
(:mod:`tokattr.results`, :mod:`tokattr.report`) imports no model code: no transformers, no
methods.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokattr.attribution import Attribution, attribute
    from tokattr.evaluation import evaluate
    from tokattr.methods import METHODS
    from tokattr.metrics import METRICS
    from tokattr.models import BUNDLED, LanguageModel, ModelNotFoundError, load_model
    from tokattr.table import EvaluationTable

__version__ = "0.1.0"

_EXPORTS = {
    "Attribution": "tokattr.attribution",
    "attribute": "tokattr.attribution",
    "evaluate": "tokattr.evaluation",
    "EvaluationTable": "tokattr.table",
    "METHODS": "tokattr.methods",
    "METRICS": "tokattr.metrics",
    "BUNDLED": "tokattr.models",
    "LanguageModel": "tokattr.models",
    "ModelNotFoundError": "tokattr.models",
    "load_model": "tokattr.models",
}

__all__ = [
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


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokattr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
