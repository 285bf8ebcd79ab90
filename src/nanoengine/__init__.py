"""nanoengine: a small, readable, pure-PyTorch runtime for small language models."""

from .config import ModelConfig
from .errors import (
    CheckpointError,
    FetchError,
    InvalidParameterError,
    NanoEngineError,
    RequestTimeoutError,
    UnknownModelError,
)
from .generation import GeneratedToken, generate
from .loading import load_model
from .model import CausalLM, KVCache
from .registry import DEFAULT_MODEL, REGISTRY, fetch_model, resolve_model
from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "CausalLM",
    "CheckpointError",
    "FetchError",
    "GeneratedToken",
    "IncrementalDetokenizer",
    "InvalidParameterError",
    "KVCache",
    "ModelConfig",
    "NanoEngineError",
    "RequestTimeoutError",
    "SamplingParams",
    "Tokenizer",
    "UnknownModelError",
    "fetch_model",
    "generate",
    "load_model",
    "resolve_model",
]
