"""nanoengine: a small, readable, pure-PyTorch runtime for small language models."""

from .completion import AsyncCompletionStream, Completion
from .config import ModelConfig
from .models import configure
from .errors import (
    CheckpointError,
    FetchError,
    InvalidParameterError,
    NanoEngineError,
    RequestTimeoutError,
    UnknownModelError,
)
from .generation import GeneratedToken, generate
from .llm import LLM, load
from .loading import load_model
from .model import CausalLM, KVCache
from .registry import DEFAULT_MODEL, REGISTRY, fetch_model, resolve_model
from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .types import (
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionStreamV1Response,
    CompletionSyncResponse,
    CompletionSyncV1Response,
    StreamError,
    StreamErrorContent,
    TokenOutput,
)

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "AsyncCompletionStream",
    "CausalLM",
    "CheckpointError",
    "Completion",
    "CompletionOutput",
    "CompletionStreamOutput",
    "CompletionStreamResponse",
    "CompletionStreamV1Response",
    "CompletionSyncResponse",
    "CompletionSyncV1Response",
    "FetchError",
    "GeneratedToken",
    "IncrementalDetokenizer",
    "InvalidParameterError",
    "KVCache",
    "LLM",
    "ModelConfig",
    "NanoEngineError",
    "RequestTimeoutError",
    "SamplingParams",
    "StreamError",
    "StreamErrorContent",
    "TokenOutput",
    "Tokenizer",
    "UnknownModelError",
    "configure",
    "fetch_model",
    "generate",
    "load",
    "load_model",
    "resolve_model",
]
