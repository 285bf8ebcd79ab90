"""Loading checkpoint folders: sharded files, dtypes, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoengine import CheckpointError, InvalidParameterError, load_model


def test_sharded_checkpoint_loads_like_a_single_file(tiny_llama_folder, tmp_path):
    state = load_file(tiny_llama_folder / "model.safetensors")
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, sharded / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(load_model(sharded)(ids), load_model(tiny_llama_folder)(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_half_precision_weights(tiny_llama_folder, dtype):
    model = load_model(tiny_llama_folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {model.lm_head.weight.dtype}
    assert model.lm_head.weight.dtype in (torch.bfloat16, torch.float16)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_no_parameter_is_left_on_the_meta_device(tiny_llama_folder):
    model = load_model(tiny_llama_folder)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def rewrite_weights(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_llama_folder):
    rewrite_weights(tiny_llama_folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tiny_llama_folder)


def test_unexpected_tensor_is_named(tiny_llama_folder):
    rewrite_weights(tiny_llama_folder, lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.9\.extra\.weight"):
        load_model(tiny_llama_folder)


def test_wrong_shape_is_named_with_both_shapes(tiny_llama_folder):
    rewrite_weights(tiny_llama_folder, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.norm\.weight \(file \[63\], model \[64\]\)"):
        load_model(tiny_llama_folder)


def test_every_problem_is_listed_at_once(tiny_llama_folder):
    def break_two(state):
        state.pop("lm_head.weight")
        state["model.norm.weight"] = torch.ones(3)

    rewrite_weights(tiny_llama_folder, break_two)
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_llama_folder)
    assert "lm_head.weight" in str(err.value) and "model.norm.weight" in str(err.value)


def test_a_file_that_is_not_safetensors(tiny_llama_folder):
    (tiny_llama_folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_model(tiny_llama_folder)


def test_a_truncated_safetensors_file(tiny_llama_folder):
    path = tiny_llama_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tiny_llama_folder)


def test_folder_without_config(tiny_llama_folder):
    (tiny_llama_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"no config.json in {tiny_llama_folder}"):
        load_model(tiny_llama_folder)


def test_folder_without_weights(tiny_llama_folder):
    (tiny_llama_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tiny_llama_folder)


def test_index_naming_a_missing_shard(tiny_llama_folder):
    (tiny_llama_folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00009.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00001-of-00009.safetensors"):
        load_model(tiny_llama_folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_unsupported_model_type(tiny_llama_folder):
    config = json.loads((tiny_llama_folder / "config.json").read_text())
    (tiny_llama_folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="model_type 'mamba'"):
        load_model(tiny_llama_folder)


@pytest.mark.parametrize("dtype", ["float64", "fp32", 3])
def test_unknown_dtype(tiny_llama_folder, dtype):
    with pytest.raises(InvalidParameterError, match="dtype must be one of"):
        load_model(tiny_llama_folder, dtype=dtype)


def test_unknown_device(tiny_llama_folder):
    with pytest.raises(InvalidParameterError, match="device"):
        load_model(tiny_llama_folder, device="tpu")


LOAD = """
from nanoengine import CheckpointError, load_model
try:
    load_model({folder!r})
except CheckpointError as err:
    print(err)
"""


def test_weights_the_user_may_not_read_are_reported_as_such(tiny_llama_folder):
    from test_fetch import run_bound_by_file_modes

    weights = tiny_llama_folder / "model.safetensors"
    weights.chmod(0o000)
    done = run_bound_by_file_modes(LOAD.format(folder=str(tiny_llama_folder)))
    assert done.returncode == 0, done.stderr
    assert f"{weights} cannot be read: permission denied" in done.stdout
    assert "No such file" not in done.stdout


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `tensor`'s data, if any (Linux)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # address range, perms, offset, device, inode, [path]
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def test_float32_weights_are_the_files_memory_map_not_copies(tiny_llama_folder):
    model = load_model(tiny_llama_folder)
    weights = str(tiny_llama_folder / "model.safetensors")
    assert all(mapped_file(p) == weights for p in model.parameters())
    converted = load_model(tiny_llama_folder, dtype="bfloat16")  # a conversion has to copy
    assert all(mapped_file(p) != weights for p in converted.parameters())


IMPORTS = """
import sys
from nanoengine import load_model
load_model({folder!r}, dtype={dtype!r})
print(sorted(m for m in ("gguf", "torch._dynamo", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_loading_imports_neither_the_converter_nor_the_compiler(tiny_llama_folder, dtype):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORTS.format(folder=str(tiny_llama_folder), dtype=dtype)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
