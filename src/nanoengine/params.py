"""The completion parameters, defined once: each one's name, default, allowed values and doc.

`CompletionParams` is the single place a parameter lives. `Completion.create`/`acreate` take
exactly its fields, in llmengine's order (`signature_of`); constructing it checks every value
before any work (errors name the parameter and what it allows, and derive from `ValueError`) and
fills in llmengine's `None` defaults. From it come the engine's `SamplingParams` (`SamplingParams.of`),
the fields the LLM Engine route reads from a body, the OpenAI routes' mapping (`Spec.openai`),
the CLI's options (`Spec.cli`) and what `llm.generate` takes as keywords (`SAMPLING_NAMES`).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any, ParamSpec, TypeVar

from .errors import InvalidParameterError

MAX_SEED = 2**64 - 1  # torch generators take seeds up to this
NO_TIMEOUT = 10**9  # seconds: a loaded model's calls (`llm.generate`, batch jobs) run until done unless given one
MAX_TEMPERATURE = 2.0

P = ParamSpec("P")
R = TypeVar("R")


# --- checks: each takes (name, value) and returns the value to keep, or raises ----------------


def number(low: float, high: float, *, low_open: bool = False) -> Callable[[str, Any], float]:
    allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def check(name: str, value: Any) -> float:
        value = _real(name, value, allowed)
        if low_open and not low < value <= high:
            raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
        if not low <= value <= high:
            raise InvalidParameterError(f"{name} must be in [{float(low)}, {float(high)}], not {value!r}")
        return value

    return check


def integer(low: int, high: int | None = None, allowed: str | None = None) -> Callable[[str, Any], int]:
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
        if value < low or (high is not None and value > high):
            raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
        return int(value)

    return check


def optional(check: Callable[[str, Any], Any], default: Any = None) -> Callable[[str, Any], Any]:
    """`check`, with `None` standing for `default` (llmengine's Optional parameters)."""
    return lambda name, value: default if value is None else check(name, value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be True or False, not {value!r}")
    return value


def top_k_value(name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == -1:
        return -1
    return integer(1, allowed="-1, None or an integer >= 1")(name, value)


def seconds(name: str, value: Any) -> float:
    value = _real(name, value, "a finite number of seconds > 0")
    if value <= 0:
        raise InvalidParameterError(f"{name} must be a finite number of seconds > 0, not {value!r}")
    return value


def prompt_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"{name} must be a non-empty string, not {value!r}")
    return unicode_text(name, value)


def unicode_text(name: str, text: str) -> str:
    """Text the tokenizer can take: no lone surrogate (JSON's `"\\ud800"` escape, Python's `"\\ud800"`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidParameterError(
            f"{name} must be valid Unicode text; it holds a lone surrogate {text[err.start]!r} at index {err.start}"
        ) from None
    return text


def stop_strings(name: str, value: Any) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidParameterError(f"{name} must be a list of non-empty strings, not {value!r}")
    return tuple(unicode_text(name, stop) for stop in stops)


def model_path(name: str, value: Any) -> str | os.PathLike:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise InvalidParameterError(f"{name} must be a registered model name or a checkpoint folder path, not {value!r}")
    return value


def _real(name: str, value: Any, allowed: str) -> float:
    """A finite real number (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
    return float(value)


# --- the parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What a parameter's field carries besides its default: its doc, its check, and how the
    OpenAI routes and the CLI spell it (`openai`: OpenAI's field name; `cli`: argparse keywords
    for `--name`, where the command offers it)."""

    doc: str
    check: Callable[[str, Any], Any]
    openai: str | None = None
    cli: dict[str, Any] | None = None


def param(default: Any, doc: str, check: Callable[[str, Any], Any], openai: str | None = None, cli: dict[str, Any] | None = None) -> Any:
    return field(default=default, metadata={"spec": Spec(doc, check, openai, cli)})


@dataclass(frozen=True)
class CompletionParams:
    """The parameters of one completion, every one checked (see the module's docstring)."""

    model_name: str | os.PathLike | None = param(None, "a registered model name or a checkpoint folder path", optional(model_path))
    prompt: str | None = param(None, "the text to continue", prompt_text)
    max_new_tokens: int = param(
        20, "the most tokens to generate", integer(0), "max_tokens",
        {"type": int, "default": 128, "metavar": "N", "help": "most tokens to generate"},
    )  # fmt: skip
    temperature: float = param(
        0.2, "0 is greedy; higher, more varied", number(0, MAX_TEMPERATURE), "temperature",
        {"type": float, "default": 0.0, "metavar": "T", "help": "0 is greedy; higher, more varied"},
    )  # fmt: skip
    timeout: float = param(
        10, "seconds for the whole request, waiting for the model included", seconds, None,
        {"type": float, "default": 600.0, "metavar": "SECONDS", "help": "give up after this long"},
    )  # fmt: skip
    stream: bool = param(False, "hand the text out in chunks as it comes", flag)
    _: KW_ONLY
    stop_sequences: tuple[str, ...] | list[str] | None = param(
        None, "end the completion at the first of these strings", optional(stop_strings, ()), "stop",
        {"flag": "--stop", "action": "append", "metavar": "TEXT", "help": "end the completion at TEXT (repeat for several)"},
    )  # fmt: skip
    return_token_log_probs: bool | None = param(False, "give each token with its log-probability", optional(flag, False), "logprobs")
    presence_penalty: float | None = param(
        None, "subtracted once from each token already generated", optional(number(0, 2), 0.0), "presence_penalty"
    )
    frequency_penalty: float | None = param(
        None, "subtracted once per time a token was generated", optional(number(0, 2), 0.0), "frequency_penalty"
    )
    top_k: int | None = param(
        None, "sample only from the k most likely tokens (-1 or None: all)", optional(top_k_value), None,
        {"type": int, "metavar": "K", "help": "sample only from the K most likely tokens"},
    )  # fmt: skip
    top_p: float | None = param(
        None, "sample only from the likeliest tokens that reach this probability", optional(number(0, 1, low_open=True)), "top_p",
        {"type": float, "metavar": "P", "help": "sample only from the likeliest tokens that reach probability P"},
    )  # fmt: skip
    include_stop_str_in_output: bool | None = param(None, "keep the stop string at the end of the text", optional(flag, False))
    skip_special_tokens: bool | None = param(True, "leave special tokens out of the text", optional(flag, True))
    seed: int | None = param(
        None, "random seed: the same seed gives the same text", optional(integer(0, MAX_SEED)), "seed",
        {"type": int, "help": "random seed: the same seed gives the same text"},
    )  # fmt: skip
    model: str | os.PathLike | None = param(None, "llmengine's spelling of model_name", optional(model_path))

    def __post_init__(self) -> None:
        if self.model_name is not None and self.model is not None and self.model_name != self.model:
            raise InvalidParameterError(f"give model_name or its alias model, not both ({self.model_name!r} and {self.model!r})")
        if self.model_name is None and self.model is None:
            raise InvalidParameterError("model_name is required: a registered model name or a checkpoint folder path")
        object.__setattr__(self, "model_name", self.model_name if self.model_name is not None else self.model)
        for f in fields(self):  # in llmengine's order, so the first bad one is named
            object.__setattr__(self, f.name, f.metadata["spec"].check(f.name, getattr(self, f.name)))


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(CompletionParams)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(CompletionParams)}
# What a loaded model's calls (`llm.generate`, `llm.complete`) take as keywords: all but the model and prompt.
SAMPLING_NAMES = tuple(name for name in SPECS if name not in ("model_name", "model", "prompt", "stream"))


def seed_for(seed: Any, index: int) -> Any:
    """The seed of the `index`-th prompt of a call given one `seed`: `seed + index`, wrapping
    within the seeds torch takes; a bad seed is left as it is for the check to name."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED:
        return (seed + index) % (MAX_SEED + 1)
    return seed


def check(name: str, value: Any) -> Any:
    """One parameter checked alone (for code that builds engine types directly)."""
    return SPECS[name].check(name, value)


def signature_of(source: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Give a function that passes `*args, **kwargs` on to `source` the signature of `source`, for
    `help()`, `inspect` and type checkers alike."""

    def give(function: Callable[..., R]) -> Callable[P, R]:
        signature = inspect.signature(source)
        function.__signature__ = signature.replace(return_annotation=inspect.signature(function).return_annotation)  # type: ignore[attr-defined]
        return function  # type: ignore[return-value]

    return give
