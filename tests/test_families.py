"""Each model family against its `transformers` class, on tiny random configs saved as safetensors:
float32 logits within 1e-5, and greedy decoding from the KV cache equal to full recomputation
(past the window, for the sliding-window families)."""

from __future__ import annotations

import pytest
import torch

from nanoengine import load_model
from nanoengine.engine.generation import generate

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16, rope_theta=1e4))


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4},
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,  # not head_dim, so that the scale shows
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        final_logit_softcapping=5.0,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # the norms start at zero: give them weights, so that (1 + w) shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return model


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # LayerNorms start at (1, 0): move them, so that a transposed or dropped one shows
        for name, param in model.named_parameters():
            if ".ln_" in name:
                param.normal_(0.5, 0.3)
    return model


FAMILIES = {"qwen2": qwen2, "mistral": mistral, "gemma3": gemma3, "gpt2": gpt2}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = FAMILIES[request.param]().eval()
    with torch.no_grad():  # random biases, so that a dropped bias shows
        for name, param in reference.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder, safe_serialization=True)
    return request.param, folder, reference


def test_logits_match_transformers(checkpoint):
    name, folder, reference = checkpoint
    ids = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, expected = load_model(folder)(ids), reference(ids).logits
    assert (ours - expected).abs().max().item() <= 1e-5


def test_cached_greedy_equals_full_recomputation(checkpoint):
    name, folder, _ = checkpoint
    model = load_model(folder)
    ids = [5, 17, 42, 99, 3]
    steps = list(generate(model, ids, 50, eos_ids=()))  # 55 positions: past a 16-token window
    with torch.inference_mode():
        for step in steps:
            logits = model(torch.tensor([ids]))[0, -1]
            assert int(torch.argmax(logits)) == step.id
            ids.append(step.id)


def test_greedy_equals_transformers_generate(checkpoint):
    name, folder, reference = checkpoint
    prompt = [5, 17, 42, 99, 3]
    with torch.inference_mode():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert [t.id for t in generate(load_model(folder), prompt, 40, eos_ids=())] == expected


def byte_level_tokenizer_json(folder) -> None:
    """A 256-token byte-level tokenizer, enough to drive a tiny model through the Completion API."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))


def test_completion_api_serves_the_family_by_folder(checkpoint):
    from nanoengine import Completion, Tokenizer

    name, folder, _ = checkpoint
    byte_level_tokenizer_json(folder)
    response = Completion.create(
        model_name=str(folder), prompt="Hello world", max_new_tokens=8, temperature=0, return_token_log_probs=True
    )
    tokenizer = Tokenizer.from_folder(folder)
    expected = list(generate(load_model(folder), tokenizer.encode("Hello world"), 8))
    # A random model's bytes seldom form UTF-8 text, so compare token by token.
    assert [t.token for t in response.output.tokens] == [tokenizer.decode([t.id], False) for t in expected]
    assert [t.log_prob for t in response.output.tokens] == pytest.approx([t.logprob for t in expected], abs=1e-5)
    assert response.output.num_completion_tokens == len(expected)
