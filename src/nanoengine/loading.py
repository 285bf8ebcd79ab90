"""Loading a Hugging Face style checkpoint folder: glob, check, assign.

The model is built on the meta device (no memory), every tensor in the safetensors files is
checked against the shapes the config implies, and the tensors read from the files are assigned
in place of the meta parameters, so the weights exist in memory once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .families import load_config, model_class
from .errors import CheckpointError, InvalidParameterError
from .model import CausalLM, RotaryEmbedding
from .quantize import quantize_rows, use_int8_modules

logger = logging.getLogger(__name__)

# int8 means weight-only int8 (see quantize.py): activations stay float.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None, compiled: bool = False) -> torch.dtype:
    """A dtype name or torch dtype; `auto` is the fastest that `device` runs well (see `auto_dtype`)."""
    if dtype == "auto":
        return auto_dtype(device or torch.device("cpu"), compiled)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidParameterError(f"dtype must be one of {', '.join(DTYPES)}, auto; not {dtype!r}")


def auto_dtype(device: torch.device, compiled: bool = False) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not compiled:
        # Uncompiled, half weights are upcast one matrix at a time: slower than float32 itself.
        return torch.float32
    # Compiled, the decode step upcasts as it reads. In one quiet run of benchmarks/bench.py on AMD
    # EPYC (2 threads) float16 decoded at 82 tok/s and bfloat16 at 72; float16 also keeps 3 more
    # mantissa bits, so its answers stay closer to float32's.
    return torch.float16


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"device must be 'cpu', 'cuda' or 'auto', not {device!r}") from None
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, ...: nanoengine runs on neither
        raise InvalidParameterError(f"device must be 'cpu', 'cuda' or 'auto', not {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device 'cuda' was asked for, but torch sees no CUDA device")
    return device


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it: one `model.safetensors`, or shards with an index."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(path) for path in files.values() if not path.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or {INDEX_FILE} in {folder}")
    return {name: single for name in _tensor_shapes(single)}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if not os.access(path, os.R_OK):  # safetensors reports this as "No such file or directory"
        mode = path.stat().st_mode & 0o777
        raise CheckpointError(
            f"{path} cannot be read: permission denied (mode {mode:o}, owner uid {path.stat().st_uid}); "
            "its owner can make it readable with chmod a+r"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, as a view of the file's memory map; the caller copies what it keeps.

    The file is mapped anew for each tensor so that, once copied, its pages leave the process's
    resident memory: one mapping kept open for the whole load keeps every page read resident
    next to the copies, twice the weights' size at the peak.
    """
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def copy_into_layout(
    tensor: torch.Tensor, like: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor` converted and copied once into memory laid out as `like` (strides included)."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=dtype or tensor.dtype, device=device)
    return out.copy_(tensor)


def expected_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """What the checkpoint must hold: every parameter, except a head tied to the embeddings."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], tied: bool) -> None:
    """Raise one error that lists every missing, unexpected and misshapen tensor by name."""
    ignorable = {"lm_head.weight"} if tied else set()  # some tied checkpoints store the head anyway
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - ignorable)
    misshapen = sorted(
        f"{name} (file {list(found[name])}, model {list(shape)})"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    )
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if names
    ]
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(problems))


def load_model(
    folder: str | Path, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build the model that `folder/config.json` describes and fill it from its safetensors files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = load_config(folder)
    with torch.device("meta"):
        model = model_class(config)(config)
    expected = expected_shapes(model)
    quantized = set()
    if dtype == torch.int8:
        with torch.device("meta"):
            quantized = use_int8_modules(model)

    files = safetensors_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        found.update(_tensor_shapes(path))
    check_tensors(expected, found, config.tie_word_embeddings)

    if device.type == "cpu":
        model.store_transposed()  # on the meta model: the loop below copies into each layout
    layouts = dict(model.state_dict(keep_vars=True))
    state = {}
    float_dtype = torch.float32 if dtype == torch.int8 else dtype  # int8: norms and biases stay float
    for name, path in sorted(files.items()):
        if name in quantized:
            weight, scale = quantize_rows(read_tensor(path, name))
            state[name] = copy_into_layout(weight, layouts[name], device)
            state[name.removesuffix("weight") + "scale"] = scale.to(device)
        elif name in expected:
            state[name] = copy_into_layout(read_tensor(path, name), layouts[name], device, float_dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():  # buffers computed, not loaded: rotary tables
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    logger.info("loaded %s (%d tensors, %s, %s)", folder, len(state), dtype, device)
    return model.eval().requires_grad_(False)
