"""Llama (SmolLM2, Llama 2 and 3): the family the decoder in `model/decoder.py` is written as.

Its checkpoint keys are the decoder's module names (`model.layers.{i}.self_attn.q_proj`, ...),
so nothing here differs; every other family is a small module that subclasses these pieces and
changes only what differs from Llama.
"""

from ..config import ModelConfig
from ..decoder import CausalLM

MODEL_TYPE = "llama"  # config.json's model_type
CONFIG = ModelConfig
MODEL = CausalLM
