"""tokattr: a benchmark suite for token attribution on causal language models.

The core (this package's top level) needs no Lightning and no W&B: ``import tokattr``
imports neither. The Lightning layer (``tokattr.lightning.train``, the runner) and the CLI do.
"""

from tokattr.attribution import Attribution, attribute
from tokattr.evaluation import EvaluationTable, evaluate
from tokattr.methods import METHODS
from tokattr.metrics import METRICS
from tokattr.models import BUNDLED, LanguageModel, ModelNotFoundError, load_model

__version__ = "0.1.0"

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
