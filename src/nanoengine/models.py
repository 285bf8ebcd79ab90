"""The process-wide model cache: how models are loaded, and each loaded model shared by all requests.

How a model is loaded (dtype, device, compilation) is a process setting, not a request
parameter: `configure()` sets it, else `$NANOENGINE_DTYPE` / `$NANOENGINE_DEVICE`, else the
defaults (device `cpu`; dtype `float32` on CPU, `auto`, i.e. `bfloat16`, on CUDA). A model is
loaded lazily, once per (checkpoint folder, options), and kept for the life of the process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import InvalidParameterError
from .loading import DTYPES, load_model, resolve_device, resolve_dtype
from .model import CausalLM
from .registry import resolve_model
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPE_ENV = "NANOENGINE_DTYPE"
DEVICE_ENV = "NANOENGINE_DEVICE"
DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded; part of the cache key."""

    dtype: torch.dtype
    device: torch.device
    compile: bool = False


@dataclass(frozen=True)
class _Settings:
    """What `configure()` was told; None defers to the environment, then to the defaults."""

    dtype: str | torch.dtype | None = None
    device: str | None = None
    compile: bool = False


_settings = _Settings()


def configure(
    dtype: str | torch.dtype | None = None, device: str | None = None, compile: bool | None = None
) -> None:
    """Set how models loaded from now on are loaded; a setting left as None stays as it was.

    `dtype`: `float32`, `bfloat16`, `float16`, `int8` (weight-only, per-row scales) or `auto`
    (bfloat16 on CUDA; on CPU float16 when compiled, else float32). Unset: float32 on CPU,
    `auto` elsewhere. `device`: `cpu`, `cuda` or `auto`. `compile`: compile each model's
    one-token decode step with `torch.compile` (start-up cost; see README "Performance").
    Models already loaded are kept, under their own options.
    """
    global _settings
    if dtype is not None:
        _check_dtype(dtype, "configure()")
    if device is not None:
        resolve_device(device)
    if compile is not None and not isinstance(compile, bool):
        raise InvalidParameterError(f"compile must be True or False, not {compile!r}")
    _settings = replace(
        _settings,
        dtype=_settings.dtype if dtype is None else dtype,
        device=_settings.device if device is None else device,
        compile=_settings.compile if compile is None else compile,
    )


def model_options() -> ModelOptions:
    """The options a model loaded now gets: `configure()`, else the environment, else the defaults."""
    device_name, source = _setting(_settings.device, DEVICE_ENV, DEFAULT_DEVICE)
    try:
        device = resolve_device(device_name)
    except InvalidParameterError as err:
        raise InvalidParameterError(f"{err} (set by {source})") from None
    default_dtype = "float32" if device.type == "cpu" else "auto"  # float32 on CPU matches the reference
    dtype_name, source = _setting(_settings.dtype, DTYPE_ENV, default_dtype)
    return ModelOptions(_check_dtype(dtype_name, source, device, _settings.compile), device, _settings.compile)


def _setting(configured: object, env: str, default: str) -> tuple[object, str]:
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


class FairLock:
    """A lock granted in the order it was asked for, so that no waiting request starves.

    (`threading.Lock` lets a thread that releases and at once re-acquires win again and again.)
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock, at most `timeout` seconds (None: for ever); return whether it was got."""
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            got = self._condition.wait_for(lambda: not self._held and self._queue[0] is ticket, timeout)
            self._queue.remove(ticket)
            if got:
                self._held = True
            else:
                self._condition.notify_all()  # the next in line may be free to go now
            return got

    def release(self) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()


@dataclass(eq=False)
class LoadedModel:
    """A model ready to serve: weights, tokenizer, and the lock that takes its forward passes in turn."""

    folder: Path
    options: ModelOptions
    model: CausalLM
    tokenizer: Tokenizer
    lock: FairLock


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
    if options.compile:
        model.compile_decode_step()  # the prompt's pass stays eager; see CausalLM.compile_decode_step
    logger.info("serving %s (%s, %s%s)", folder, options.dtype, options.device, ", compiled" if options.compile else "")
    return LoadedModel(folder, options, model, tokenizer, FairLock())
