"""The process-wide model cache: how models are loaded, and each loaded model (with its engine)
shared by all requests.

How a model is loaded (dtype, device, compilation) and how its engine is sized (concurrent
sequences, longest sequence, prefill chunk) are process settings, not request parameters:
`configure()` sets them, else the `NANOENGINE_*` environment variables, else the defaults
(device `cpu`; dtype `float32` on CPU, `auto`, i.e. `bfloat16`, on CUDA; the engine's in
`EngineSettings`). A model is loaded lazily, once per (checkpoint folder, options), and kept for
the life of the process.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..engine.loop import Engine, EngineSettings
from ..errors import InvalidParameterError
from ..weights.loading import DTYPES, load_model, resolve_device, resolve_dtype
from ..model.decoder import CausalLM
from ..weights.registry import resolve_model
from ..model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPE_ENV = "NANOENGINE_DTYPE"
DEVICE_ENV = "NANOENGINE_DEVICE"
DEFAULT_DEVICE = "cpu"
ENGINE_ENV = {  # EngineSettings field -> environment variable
    "max_batch_size": "NANOENGINE_MAX_BATCH_SIZE",
    "max_seq_len": "NANOENGINE_MAX_SEQ_LEN",
    "prefill_chunk": "NANOENGINE_PREFILL_CHUNK",
    "background_compile": "NANOENGINE_BACKGROUND_COMPILE",
    "cuda_graphs": "NANOENGINE_CUDA_GRAPHS",
}
FLAGS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded; part of the cache key."""

    dtype: torch.dtype
    device: torch.device
    compile: bool = False
    engine: EngineSettings = EngineSettings()


@dataclass(frozen=True)
class _Settings:
    """What `configure()` was told; None defers to the environment, then to the defaults."""

    dtype: str | torch.dtype | None = None
    device: str | None = None
    compile: bool = False
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    prefill_chunk: int | None = None
    background_compile: bool | None = None
    cuda_graphs: bool | None = None


_settings = _Settings()


def configure(
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    compile: bool | None = None,
    *,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    prefill_chunk: int | None = None,
    background_compile: bool | None = None,
    cuda_graphs: bool | None = None,
) -> None:
    """Set how models loaded from now on are loaded; a setting left as None stays as it was.

    `dtype`: `float32`, `bfloat16`, `float16`, `int8` or `int4` (weight-only, blocks of 32 with a
    scale and offset each, exact for weights that came from such blocks) or `auto`
    (bfloat16 on CUDA; on CPU float16 when compiled, else float32). Unset: float32 on CPU,
    `auto` elsewhere. `device`: `cpu`, `cuda` or `auto`. `compile`: compile each engine's
    one-sequence decode steps with `torch.compile` from its first step on, in the background
    (see `compiling.py` and README "Performance").
    The engine: `max_batch_size` sequences decode together (the rows of the KV cache pool, which
    is allocated once, so memory is bounded; more requests wait in line); `max_seq_len` is the
    longest prompt plus new tokens a row holds (at most the model's context); `prefill_chunk` is
    how many prompt tokens are prefilled per step, which bounds how long a new prompt can delay
    the running streams' next token; `background_compile` (on by default) lets an engine that
    has decoded a few hundred tokens compile its decode step in a thread of its own and switch to
    it when ready (see `compiling.py`; `compile=True` compiles before serving instead); on a GPU,
    `cuda_graphs` (on by default) has it replay each decode step as a CUDA graph instead (see
    `graphs.py`), and compile nothing unasked. Models already loaded are kept, under their own
    options.
    """
    global _settings
    if dtype is not None:
        _check_dtype(dtype, "configure()")
    if device is not None:
        resolve_device(device)
    if compile is not None and not isinstance(compile, bool):
        raise InvalidParameterError(f"compile must be True or False, not {compile!r}")
    sizes = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
    for name, value in sizes.items():
        if value is not None:
            _positive_int(name, value, "configure()")
    flags = dict(background_compile=background_compile, cuda_graphs=cuda_graphs)
    for name, value in flags.items():
        if value is not None:
            _flag(name, value, "configure()")
    given = dict(dtype=dtype, device=device, compile=compile, **flags, **sizes)
    _settings = replace(_settings, **{name: value for name, value in given.items() if value is not None})


def _positive_int(name: str, value: object, source: str) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]
        ok = not isinstance(value, (bool, float)) and number >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidParameterError(f"{name} must be an integer >= 1, not {value!r} (set by {source})")
    return number


def engine_settings() -> EngineSettings:
    """The engine sizes a model loaded now gets: `configure()`, else the environment, else the defaults."""
    values = {}
    for field in fields(EngineSettings):
        value, source = _setting(getattr(_settings, field.name), ENGINE_ENV[field.name], field.default)
        check = _flag if isinstance(field.default, bool) else _positive_int
        values[field.name] = check(field.name, value, source)
    return EngineSettings(**values)


def _flag(name: str, value: object, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in FLAGS:
        return FLAGS[value.strip().lower()]
    raise InvalidParameterError(f"{name} must be on or off (1/0, true/false), not {value!r} (set by {source})")


def model_options() -> ModelOptions:
    """The options a model loaded now gets: `configure()`, else the environment, else the defaults."""
    device_name, source = _setting(_settings.device, DEVICE_ENV, DEFAULT_DEVICE)
    try:
        device = resolve_device(device_name)
    except InvalidParameterError as err:
        raise InvalidParameterError(f"{err} (set by {source})") from None
    default_dtype = "float32" if device.type == "cpu" else "auto"  # float32 on CPU matches the reference
    dtype_name, source = _setting(_settings.dtype, DTYPE_ENV, default_dtype)
    dtype = _check_dtype(dtype_name, source, device, _settings.compile)
    return ModelOptions(dtype, device, _settings.compile, engine_settings())


def _setting(configured: object, env: str, default: object) -> tuple[object, str]:
    """The configured value, else the environment's, else the default; and where it came from."""
    if configured is not None:
        return configured, "configure()"
    if os.environ.get(env):
        return os.environ[env], f"${env}"
    return default, "default"


def _check_dtype(
    dtype: str | torch.dtype, source: str, device: torch.device | None = None, compile: bool = False
) -> torch.dtype:
    """Resolve a dtype name (`auto`: see `loading.auto_dtype`), naming where a bad one came from."""
    try:
        return resolve_dtype(dtype, device, compiled=compile)
    except InvalidParameterError:
        raise InvalidParameterError(
            f"dtype must be one of {', '.join(DTYPES)}, auto; not {dtype!r} (set by {source})"
        ) from None


@dataclass(eq=False)
class LoadedModel:
    """A model ready to serve: weights, tokenizer, and the engine whose loop runs every request on it."""

    folder: Path
    options: ModelOptions
    model: CausalLM
    tokenizer: Tokenizer
    engine: Engine


_cache: dict[tuple[str, ModelOptions], LoadedModel] = {}
_load_locks: dict[tuple[str, ModelOptions], threading.Lock] = {}
_cache_lock = threading.Lock()  # guards _load_locks; each key's load lock guards its _cache entry


def get_model(name_or_path: str | os.PathLike) -> LoadedModel:
    """The loaded model for a registered name or checkpoint folder, loading it on first use."""
    folder = resolve_model(name_or_path)
    options = model_options()
    key = (str(folder.resolve()), options)
    with _cache_lock:
        load_lock = _load_locks.setdefault(key, threading.Lock())
    with load_lock:
        if key not in _cache:
            _cache[key] = _load(folder, options)
        return _cache[key]


def _load(folder: Path, options: ModelOptions) -> LoadedModel:
    tokenizer = Tokenizer.from_folder(folder)
    model = load_model(folder, dtype=options.dtype, device=options.device)
    # compile=True compiles from the first decode step on, in the background (see compiling.py).
    engine = Engine(model, options.engine, compile_now=options.compile)
    logger.info(
        "serving %s (%s, %s%s); engine: %d sequences of up to %d tokens, KV cache %.0f MB, prefill chunk %d",
        folder, options.dtype, options.device, ", compiled" if options.compile else "",
        options.engine.max_batch_size, engine.max_seq_len, engine.kv_cache_bytes / 2**20, options.engine.prefill_chunk,
    )  # fmt: skip
    return LoadedModel(folder, options, model, tokenizer, engine)
