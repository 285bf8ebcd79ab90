"""Reading config.json: field spellings old and new, and errors."""

from __future__ import annotations

import json

import pytest

from nanoengine import CheckpointError, ModelConfig

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
