"""Reading config.json: field spellings old and new, and errors."""

from __future__ import annotations

import json

import pytest

import re

from nanoengine import CheckpointError, ModelConfig, Tokenizer, load_model
from nanoengine.model.families import load_config

BASE = dict(
    model_type="llama",
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def test_defaults_follow_transformers():
    config = ModelConfig.from_dict(BASE)
    assert config.num_key_value_heads == 4  # no GQA field: one kv head per query head
    assert config.head_dim == 16
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings is False


def test_rope_theta_in_either_spelling():
    old = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert old.rope_theta == new.rope_theta == 500000.0


def test_llama3_rope_scaling_in_either_spelling():
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    old = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **params}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **params}})
    assert old == new and old.rope_scaling.factor == 8.0


def test_eos_ids_from_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    assert ModelConfig.from_folder(tmp_path).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelConfig.from_folder(tmp_path).eos_token_ids == (2, 7)


def test_missing_field_is_named():
    with pytest.raises(CheckpointError, match="hidden_size"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "hidden_size"})


def test_unsupported_rope_type():
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.from_folder(tmp_path)


# --- malformed files: a CheckpointError naming the file and the field (issue 13, item 10) ---


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: [c], r"config\.json must hold a JSON object, not a list"),
        (lambda c: {**c, "rope_scaling": [1]}, r"config\.json: rope_scaling must be an object or null, not \[1\]"),
        (lambda c: {**c, "rms_norm_eps": None}, r"config\.json: rms_norm_eps must be a finite number, not None"),
        (lambda c: {**c, "hidden_size": "abc"}, r"config\.json: hidden_size must be an integer >= 1, not 'abc'"),
        (lambda c: {**c, "num_hidden_layers": -2}, r"config\.json: num_hidden_layers must be an integer >= 1"),
        (lambda c: {**c, "max_position_embeddings": 10**12}, r"max_position_embeddings must be in 1\.\.16777216"),
    ],
)
def test_a_malformed_config_is_a_checkpoint_error_naming_the_field(tiny_llama_folder, change, message):
    path = tiny_llama_folder / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=message):
        load_model(tiny_llama_folder)


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_malformed_side_file_is_a_checkpoint_error_naming_it(smollm2_folder, tmp_path, name, text):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for file in ("config.json", "tokenizer.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        (folder / file).symlink_to(smollm2_folder / file)
    (folder / name).unlink()
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(folder / name))):
        load_config(folder)
        Tokenizer.from_folder(folder)
