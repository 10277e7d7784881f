"""ctxmem: memory beyond the context window for self-hosted RoPE language models.

The public entry points are imported here; heavy modules load on first use.
"""

from ctxmem.model import REFERENCE_MODEL_NAME, UnsupportedModelError, load_model
from ctxmem.rope_scaling import RopeScaling

__version__ = "0.1.0"

__all__ = ["REFERENCE_MODEL_NAME", "RopeScaling", "UnsupportedModelError", "load_model", "__version__"]
