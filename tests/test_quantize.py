"""Group-wise int8 and int4 (quantize.py): exact where the weights came from Q4_1 / Q8_0 blocks,
close elsewhere; the GGUF's own blocks as the fetch keeps them; every family loaded quantized and
generating greedily, its tied head sharing the embedding's codes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny_llama
from test_families import FAMILIES
from test_model import REAL_PROMPTS

from nanoengine import load_model
from nanoengine.engine.compiling import compile_steps, in_step_form
from nanoengine.engine.generation import generate
from nanoengine.weights.loading import BLOCKS_FILE, mapped_tensors
from nanoengine.weights.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    dequantize,
    group_size,
    quantize,
)


def q4_1_weights(rows: int = 8, groups: int = 4) -> torch.Tensor:
    """Float32 weights dequantized from random Q4_1 blocks (each block spans codes 0 to 15)."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (rows, groups, 32), generator=generator, dtype=torch.uint8)
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(rows, groups, generator=generator) * 0.01 + 1e-4).half()
    offset = (-torch.rand(rows, groups, generator=generator) * 0.1).half()
    return dequantize(codes, scale, offset, packed=False)


def q8_0_weights(rows: int = 8, groups: int = 4) -> torch.Tensor:
    """Float32 weights dequantized from random Q8_0 blocks (w = d * q, q in [-127, 127])."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (rows, groups, 32), generator=generator)
    q[..., 0] = 127 * torch.where(torch.rand(rows, groups, generator=generator) < 0.5, -1, 1)
    d = (torch.rand(rows, groups, generator=generator) * 0.01 + 1e-4).half()
    return (q.float() * d.float()[..., None]).flatten(-2)


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_from_q4_1_blocks_round_trip_bit_for_bit(bits):
    weights = q4_1_weights()
    q = quantize(weights, bits)
    assert torch.equal(dequantize(q["codes"], q["scale"], q["offset"], packed=bits == 4), weights)


def test_weights_from_q8_0_blocks_round_trip_bit_for_bit_in_8_bits():
    weights = q8_0_weights()
    q = quantize(weights, 8)
    assert torch.equal(dequantize(q["codes"], q["scale"], q["offset"], packed=False), weights)


@pytest.mark.parametrize("bits", [4, 8])
def test_other_weights_are_rounded_to_the_nearest_step(bits):
    weights = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    q = quantize(weights, bits)
    error = (dequantize(q["codes"], q["scale"], q["offset"], packed=bits == 4) - weights).view(16, 4, 32)
    step = q["scale"].float()  # (16, 4)
    # Half a step, plus the float16 rounding of scale and offset (2^-11 relative).
    bound = step / 2 + 2**-10 * weights.view(16, 4, 32).abs().amax(-1)
    assert (error.abs().amax(-1) <= bound).all()
    assert error.abs().max() > 0  # rounded, not stored


def test_4_bit_codes_are_packed_as_in_the_gguf_block():
    values = torch.arange(32, dtype=torch.float32) % 16  # codes 0..15, 0..15 with scale 1, offset 0
    q = quantize(values[None, :], 4)
    expected = torch.tensor([j | ((j + 16) % 16) << 4 for j in range(16)], dtype=torch.uint8)
    assert q["codes"].shape == (1, 1, 16) and torch.equal(q["codes"][0, 0], expected)


def test_rows_that_do_not_split_into_32s_are_one_group():
    weights = torch.randn(3, 40)
    q = quantize(weights, 8)
    assert q["codes"].shape == (3, 1, 40)
    assert (dequantize(q["codes"], q["scale"], q["offset"], packed=False) - weights).abs().max() < 0.05


def test_a_width_whose_codes_do_not_fill_words_has_no_layout():
    assert group_size(40, 4) == 40 and group_size(40, 8) == 40  # one group: 20 and 40 bytes
    assert group_size(36, 4) == 0 and group_size(36, 8) == 36  # 18 bytes: 4-bit codes do not fill words
    assert group_size(6, 8) == 0


# Rows in blocks of 8, 4 and 1 (the kernel layout's row blocks), groups of 32 and a one-group row.
LAYOUT_SHAPES = [(16, 64), (12, 96), (3, 40)]


def loaded(module: QuantizedTensor, weights: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor]:
    """`module` holding `weights` quantized, and the weights its blocks stand for (file layout)."""
    q = quantize(weights, module.bits)
    module.load_blocks(q["codes"], q["scale"], q["offset"])
    return module, dequantize(q["codes"], q["scale"], q["offset"], packed=module.bits == 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_row_major_copy_follows_new_blocks_and_shared_ones(bits):
    first, second = (torch.randn(16, 64, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    linear, expected = loaded(QuantizedLinear(64, 16, bits, bias=False), first)
    assert torch.equal(linear.dequantized(), expected)  # the row-major copy is made here
    _, expected = loaded(linear, second)  # new blocks: the copy is made again
    assert torch.equal(linear.dequantized(torch.empty(16 * 64 + 5)), expected)
    head, _ = loaded(QuantizedLinear(64, 16, bits, bias=False), first)
    head.dequantized()
    head.share(linear)  # a tied head takes its embedding's blocks
    assert torch.equal(head.dequantized(), expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, width", LAYOUT_SHAPES)
def test_the_kernel_layout_holds_the_blocks_weights(bits, rows, width):
    weights = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    linear, expected = loaded(QuantizedLinear(width, rows, bits, bias=False), weights)
    assert torch.equal(linear.dequantized(), expected)
    assert torch.equal(linear.dequantized_in_graph(), expected)
    ids = torch.tensor([[0, rows - 1], [rows // 2, 1]])
    embedding, _ = loaded(QuantizedEmbedding(rows, width, bits), weights)
    assert torch.equal(embedding(ids), expected[ids])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, width", LAYOUT_SHAPES)
def test_the_one_token_product_reads_the_codes_and_matches_the_weights(bits, rows, width):
    generator = torch.Generator().manual_seed(rows)
    linear, weights = loaded(QuantizedLinear(width, rows, bits, bias=False), torch.randn(rows, width, generator=generator))
    x = torch.randn(2, width, generator=generator)
    assert torch.allclose(linear.matvec(x), x @ weights.T, rtol=1e-5, atol=1e-5)
    one_token = x[:1, None]  # (1, 1, in)
    for rows, x_rows in [(1, one_token), (2, x[:, None])]:  # the forms the runner's compiled steps take
        step = torch.compile(in_step_form(linear, rows), fullgraph=True, dynamic=False)
        assert torch.allclose(step(x_rows), x_rows @ weights.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(linear(x[:, None]), x[:, None] @ weights.T, rtol=1e-5, atol=1e-5)  # eager


# Every family's tiny checkpoint, and Llama with a tied and an untied head.
CHECKPOINTS = [*FAMILIES, "llama", "llama-tied"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("llama"):
        return save_tiny_llama(folder, tie_word_embeddings=request.param == "llama-tied")
    torch.manual_seed(0)
    FAMILIES[request.param]().save_pretrained(folder, safe_serialization=True)
    return folder


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_family_loads_quantized_and_generates_greedily(family_folder, dtype):
    model = load_model(family_folder, dtype=dtype)
    assert not [name for name, t in tensors(model).items() if t.is_meta]
    layers = [m for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and name != "lm_head"]
    assert layers and {m.bits for m in layers} == {4 if dtype == "int4" else 8}
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    if model.config.tie_word_embeddings:  # the head reads the embedding's own tensors (GPT-2 included)
        embedding = next(m for m in model.modules() if isinstance(m, QuantizedEmbedding) and m.codes is model.lm_head.codes)
        assert embedding.scale is model.lm_head.scale and embedding.offset is model.lm_head.offset

    ids = [5, 17, 42, 99, 3]
    steps = list(generate(model, ids, 20, eos_ids=()))
    with torch.inference_mode():
        for step in steps:  # the cached steps agree with recomputing the whole sequence
            assert int(torch.argmax(model(torch.tensor([ids]))[0, -1])) == step.id
            ids.append(step.id)
        quantized, full = model(torch.tensor([ids])), load_model(family_folder)(torch.tensor([ids]))
    # Close to float32 (relative error of the logits), but not equal: random weights are no blocks.
    error = ((quantized - full).norm() / full.norm()).item()
    assert 0 < error <= (0.05 if dtype == "int8" else 0.5)


@pytest.fixture(scope="module", params=["int4", "int8"])
def smollm2_quantized(request, smollm2_folder):
    return load_model(smollm2_folder, dtype=request.param)


def test_real_model_weights_are_the_float32_weights_bit_for_bit(smollm2, smollm2_quantized):
    floats = dict(smollm2.model.named_parameters())
    quantized = {name: m for name, m in smollm2_quantized.named_modules() if isinstance(m, QuantizedTensor)}
    assert len(quantized) == 30 * 7 + 2  # every projection, the embedding, and the head tied to it
    for name, module in quantized.items():
        if name != "lm_head":  # tied: the embedding's weight
            assert torch.equal(module.dequantized(), floats[f"{name}.weight"]), name
    head, embedding = smollm2_quantized.lm_head, smollm2_quantized.model.embed_tokens
    assert head.codes is embedding.codes and head.bits == embedding.bits == 8


def test_the_fetched_blocks_are_what_quantizing_at_load_time_gives(smollm2, smollm2_folder):
    blocks = mapped_tensors(smollm2_folder / BLOCKS_FILE)
    floats = dict(smollm2.model.named_parameters())
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        ours = quantize(floats[f"{module}.weight"], 4)
        assert all(torch.equal(ours[key], blocks[f"{module}.{key}"]) for key in ("codes", "scale", "offset"))
    ours = quantize(floats["model.embed_tokens.weight"], 8)
    assert all(torch.equal(ours[key], blocks[f"model.embed_tokens.{key}"]) for key in ("codes", "scale", "offset"))


@pytest.mark.parametrize("name", REAL_PROMPTS)
def test_real_model_logits_are_float32s(smollm2, smollm2_quantized, name):
    ids = torch.tensor([smollm2.tokenizer.encode(REAL_PROMPTS[name])])
    with torch.inference_mode():
        quantized, full = smollm2_quantized(ids, last_only=True), smollm2.model(ids, last_only=True)
    # The same weights; only the matrix kernels' summation order may differ (memory alignment).
    assert (quantized - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["chat", "french"])
def test_real_model_greedy_output_is_float32s(smollm2, smollm2_quantized, name):
    prompt = smollm2.tokenizer.encode(REAL_PROMPTS[name])
    expected = [t.id for t in generate(smollm2.model, prompt, 16, eos_ids=())]
    assert [t.id for t in generate(smollm2_quantized, prompt, 16, eos_ids=())] == expected


def test_real_model_batched_steps_give_float32s_greedy_output(smollm2, smollm2_quantized):
    """Five prompts prefilled together and decoded as one batch (each step dequantizing every
    weight once, into the reused buffer): each gets float32's own greedy tokens."""
    from nanoengine.engine.loop import Engine, EngineSettings
    from nanoengine.engine.scheduler import Sequence

    prompts = [smollm2.tokenizer.encode(text) for text in REAL_PROMPTS.values()][:5]
    engine = Engine(smollm2_quantized, EngineSettings(max_batch_size=8, background_compile=False))
    runner, rows = engine.runner, [Sequence(ids, 12, math.inf) for ids in prompts]
    for seq in rows:
        engine.scheduler.add(seq)
    batch = engine.scheduler.next_prefill()
    assert batch.sequences == rows  # one batched prompt pass
    logits = runner.prefill(batch)
    for seq, ids in zip(rows, prompts):
        seq.pos = len(ids)
    got = [[] for _ in rows]
    for _ in range(12):
        for seq, out, token in zip(rows, got, logits.argmax(-1).tolist()):
            seq.next_token = token
            out.append(token)
        logits = runner.decode(rows)  # (5, V): one multi-row step
        for seq in rows:
            seq.pos += 1
    for ids, out in zip(prompts, got):
        assert out == [t.id for t in generate(smollm2.model, ids, 12, eos_ids=())]


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_the_compiled_decode_step_keeps_the_quantized_models_greedy_output(tmp_path, dtype):
    folder = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    eager = load_model(folder, dtype=dtype)
    expected = [step.id for step in generate(eager, [5, 17, 42], 24, eos_ids=())]
    compiled = load_model(folder, dtype=dtype)
    compile_steps(compiled)  # the runner's one-token step through QuantizedTensor.matvec, the head included
    assert [step.id for step in generate(compiled, [5, 17, 42], 24, eos_ids=())] == expected
