"""tokattr: a benchmark suite for token attribution on causal language models.

The core (this package's top level) needs no Lightning and no W&B: ``import tokattr``
imports neither. The Lightning layer (``tokattr.train``, the runner) and the CLI do.
"""

from tokattr.attribution import Attribution, attribute
from tokattr.methods import METHODS
from tokattr.models import BUNDLED, LanguageModel, ModelNotFoundError, load_model

__version__ = "0.1.0"

__all__ = [
    "BUNDLED",
    "METHODS",
    "Attribution",
    "LanguageModel",
    "ModelNotFoundError",
    "__version__",
    "attribute",
    "load_model",
]
