"""nanoengine: a small, readable, pure-PyTorch runtime for small language models."""

from .api.completion import Completion
from .api.outputs import AsyncCompletionStream
from .model.config import ModelConfig
from .api.models import configure
from .errors import (
    CheckpointError,
    FetchError,
    InvalidParameterError,
    NanoEngineError,
    RequestTimeoutError,
    UnknownModelError,
)
from .engine.generation import GeneratedToken, generate
from .api.llm import LLM, load
from .weights.loading import load_model
from .model.decoder import CausalLM
from .model.kv_cache import KVCache
from .weights.registry import DEFAULT_MODEL, REGISTRY, fetch_model, resolve_model
from .engine.sampling import SamplingParams
from .model.tokenizer import IncrementalDetokenizer, Tokenizer
from .api.types import (
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
