"""afmkit: Apple's foundation-model recipe as a JAX library."""

from afmkit.config import SIZES, ModelConfig, get_size
from afmkit.errors import UserError
from afmkit.infer.engine import Completion, Engine, StreamEvent
from afmkit.infer.sampling import SamplingParams
from afmkit.lm import DEFAULT_MODEL, LanguageModel, known_models, load

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "SIZES",
    "Completion",
    "Engine",
    "LanguageModel",
    "ModelConfig",
    "SamplingParams",
    "StreamEvent",
    "UserError",
    "get_size",
    "known_models",
    "load",
]
