"""Checking a completion request's parameters, all of them, before any work starts.

Each error names the parameter and the values it allows, and derives from `ValueError`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError
from ..engine.sampling import SamplingParams

MAX_SEED = 2**64 - 1  # torch generators take seeds up to this


@dataclass(frozen=True)
class CompletionRequest:
    """A request whose parameters are all valid; nothing is loaded or tokenized yet."""

    model_name: str | os.PathLike
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    timeout: float
    stop_sequences: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    return_token_log_probs: bool = False
    skip_special_tokens: bool = True
    # Internal, not a `Completion.create` parameter: how many likeliest alternatives the engine
    # reports beside each generated token (OpenAI's `top_logprobs`; needs return_token_log_probs).
    top_logprobs: int = 0


def validate_request(
    model_name: Any,
    model: Any,
    prompt: Any,
    max_new_tokens: Any,
    temperature: Any,
    timeout: Any,
    stream: Any,
    stop_sequences: Any,
    return_token_log_probs: Any,
    presence_penalty: Any,
    frequency_penalty: Any,
    top_k: Any,
    top_p: Any,
    include_stop_str_in_output: Any,
    skip_special_tokens: Any,
    seed: Any,
) -> CompletionRequest:
    """Check every parameter of `Completion.create`."""
    timeout = _number("timeout", timeout, "a finite number of seconds > 0")
    if timeout <= 0:
        raise InvalidParameterError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
    _flag("stream", stream)
    sampling = SamplingParams(
        temperature=_number("temperature", temperature, "a number in [0, 2]"),
        top_k=None if top_k is None else _integer("top_k", top_k, "-1, None or an integer >= 1"),
        top_p=None if top_p is None else _top_p(top_p),
        presence_penalty=_penalty("presence_penalty", presence_penalty),
        frequency_penalty=_penalty("frequency_penalty", frequency_penalty),
        seed=None if seed is None else _seed(seed),
    )
    return CompletionRequest(
        model_name=_model_name(model_name, model),
        prompt=_prompt(prompt),
        max_new_tokens=_max_new_tokens(max_new_tokens),
        sampling=sampling,
        timeout=timeout,
        stop_sequences=_stop_sequences(stop_sequences),
        include_stop_str_in_output=_flag("include_stop_str_in_output", include_stop_str_in_output, False),
        return_token_log_probs=_flag("return_token_log_probs", return_token_log_probs, False),
        skip_special_tokens=_flag("skip_special_tokens", skip_special_tokens, True),
    )


def _model_name(model_name: Any, model: Any) -> str | os.PathLike:
    if model_name is not None and model is not None and model_name != model:
        raise InvalidParameterError(f"give model_name or its alias model, not both ({model_name!r} and {model!r})")
    name = model_name if model_name is not None else model
    if name is None:
        raise InvalidParameterError("model_name is required: a registered model name or a checkpoint folder path")
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise InvalidParameterError(
            f"model_name must be a registered model name or a checkpoint folder path, not {name!r}"
        )
    return name


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameterError(f"prompt must be a non-empty string, not {prompt!r}")
    _unicode("prompt", prompt)
    return prompt


def _unicode(name: str, text: str) -> None:
    """Text the tokenizer can take: no lone surrogate (JSON's `"\\ud800"` escape, Python's `"\\ud800"`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidParameterError(
            f"{name} must be valid Unicode text; it holds a lone surrogate {text[err.start]!r} at index {err.start}"
        ) from None


def _max_new_tokens(value: Any) -> int:
    value = _integer("max_new_tokens", value, "an integer >= 0")
    if value < 0:
        raise InvalidParameterError(f"max_new_tokens must be an integer >= 0, not {value!r}")
    return value


def _seed(value: Any) -> int:
    value = _integer("seed", value, f"an integer in [0, {MAX_SEED}]")
    if not 0 <= value <= MAX_SEED:
        raise InvalidParameterError(f"seed must be an integer in [0, {MAX_SEED}], not {value!r}")
    return value


def _top_p(value: Any) -> float:
    value = _number("top_p", value, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:  # said here, as SamplingParams would call the range [0, 1]
        raise InvalidParameterError(f"top_p must be a number in (0, 1], not {value!r}")
    return value


def _penalty(name: str, value: Any) -> float:
    return 0.0 if value is None else _number(name, value, "a number in [0, 2]")


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidParameterError(f"stop_sequences must be a list of non-empty strings, not {value!r}")
    for stop in stops:
        _unicode("stop_sequences", stop)
    return tuple(stops)


def _number(name: str, value: Any, allowed: str) -> float:
    """A finite real number (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
    return float(value)


def _integer(name: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be {allowed}, not {value!r}")
    return int(value)


def _flag(name: str, value: Any, default: bool | None = None) -> bool:
    """A bool; None means `default` where the parameter has one (llmengine's Optional[bool])."""
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be True or False, not {value!r}")
    return value
