"""afmkit: Apple's foundation-model recipe as a JAX library."""

from afmkit.config import SIZES, ModelConfig, get_size
from afmkit.errors import UserError
from afmkit.infer.engine import Completion, Engine, StreamEvent
from afmkit.infer.sampling import SamplingParams
from afmkit.lm import LanguageModel, load
from afmkit.weights import DEFAULT_MODEL, known_models

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
