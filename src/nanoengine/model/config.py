"""Model configuration, read from a checkpoint's `config.json` (Hugging Face field names)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# The longest context a checkpoint may declare: rotary tables are sized by it (1M-token models fit).
MAX_POSITIONS = 1 << 24
_REQUIRED = object()


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise CheckpointError(f"config.json must hold a JSON object, not {_json_type(raw)}")
        try:
            config = cls(**cls.fields_from(raw))
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks the field {missing}") from None
        except (TypeError, ValueError, AttributeError) as err:  # a family's own field, read as is
            raise CheckpointError(f"config.json has a field of the wrong type: {err}") from None
        if not 0 < config.max_position_embeddings <= MAX_POSITIONS:
            raise CheckpointError(
                f"config.json: max_position_embeddings must be in 1..{MAX_POSITIONS}, "
                f"not {config.max_position_embeddings}"
            )
        return config

    @classmethod
    def fields_from(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """This class's fields from the raw `config.json`; a family's subclass adds its own."""
        hidden = _int(raw, "hidden_size")
        heads = _int(raw, "num_attention_heads")
        theta, scaling = _read_rope(raw)
        return dict(
            model_type=raw.get("model_type", "llama"),
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", heads),
            head_dim=_int(raw, "head_dim", hidden // heads),
            max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_ids(raw.get("eos_token_id")),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        return cls.from_dict(read_config(folder))


def read_config(folder: str | Path) -> dict[str, Any]:
    """The raw `config.json`, with the end-of-sequence ids of `generation_config.json` if it has any."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {Path(folder)}")
    raw = read_json_object(path)
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():
        eos = read_json_object(generation).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    return raw


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, which must hold an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read: permission denied") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {_json_type(raw)}")
    return raw


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _int(raw: dict[str, Any], name: str, default: Any = _REQUIRED) -> int:
    """A positive integer field (absent or null: `default`)."""
    value = raw.get(name)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"config.json lacks the field {name!r}")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"config.json: {name} must be an integer >= 1, not {value!r}")
    return value


def _float(raw: dict[str, Any], name: str, default: float) -> float:
    """A finite number field (absent: `default`; null is an error, as transformers would fail on it)."""
    if name not in raw:
        return default
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {name} must be a finite number, not {value!r}")
    return float(value)


def _read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Rotary base and scaling, from either `rope_theta`/`rope_scaling` or the newer `rope_parameters`."""
    for name in ("rope_parameters", "rope_scaling"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise CheckpointError(f"config.json: {name} must be an object or null, not {raw[name]!r}")
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = _float(params, "rope_theta", _float(raw, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"config.json asks for rope_type {rope_type!r}; supported: default, llama3")
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
    return theta, scaling


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

