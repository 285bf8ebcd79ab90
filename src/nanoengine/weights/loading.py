"""Loading a Hugging Face style checkpoint folder: glob, check, assign.

The model is built on the meta device (no memory), every tensor in the safetensors files is
checked against the shapes the config implies, and the tensors are assigned in place of the meta
parameters as the files' memory maps hold them: nothing is copied unless the dtype or device
asks for a conversion, so loading costs little more than mapping the files, and the weights'
pages are shared with every other process that maps the same file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

from ..model.config import ModelConfig
from ..model.families import load_config, model_class
from ..errors import CheckpointError, InvalidParameterError
from ..model.decoder import CausalLM, RotaryEmbedding
from .quantize import GROUP_SIZE, QuantizationPlan, QuantizedWeight, use_quantized_modules
from ..threads import choose_threads

logger = logging.getLogger(__name__)

# int8 and int4 mean weight-only, group-wise (see quantize.py): activations stay float.
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "int4": torch.int4,
}
QUANTIZED_BITS = {torch.int8: 8, torch.int4: 4}
INDEX_FILE = "model.safetensors.index.json"
# The GGUF's Q4_1 and Q8_0 blocks as the fetch took them, in `quantize.py`'s layout (convert.py).
BLOCKS_FILE = "model.blocks.safetensors"


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


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of its private (copy-on-write) memory map."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


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


class SkipInitialization(TorchFunctionMode):
    """Make the modules' in-place weight initialisations no-ops: loading replaces every value.

    On the meta device they would compute nothing anyway, but the first `normal_` there imports
    `torch._dynamo` for its decomposition, a second or more of start-up.
    """

    INITIALIZERS = frozenset({"normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zero_", "fill_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.INITIALIZERS:
            return args[0] if args else kwargs["tensor"]  # torch.nn.init passes it by name
        return func(*args, **kwargs)


def build_on_meta(config: ModelConfig) -> CausalLM:
    """The model for `config` with every tensor on the meta device: shapes only, no memory."""
    with torch.device("meta"), SkipInitialization():
        return model_class(config)(config)


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
    choose_threads()  # once per process: the CPUs other processes leave idle (threads.py)
    model = build_on_meta(config)
    expected = expected_shapes(model)
    files = safetensors_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        found.update(_tensor_shapes(path))
    check_tensors(expected, found, config.tie_word_embeddings)

    plan = None
    if dtype in QUANTIZED_BITS:
        with torch.device("meta"):
            plan = use_quantized_modules(model, QUANTIZED_BITS[dtype])
    float_dtype = torch.float32 if plan else dtype  # quantized: norms and biases stay float32
    state = read_state(folder, files, expected, plan, float_dtype, device)
    if plan:
        plan.load(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    if not (plan and plan.tied):  # a head tied to a quantized embedding shares its codes instead
        model.tie_weights()
    for module in model.modules():  # buffers computed, not loaded: rotary tables
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    logger.info("loaded %s (%d tensors, %s, %s)", folder, len(state), dtype, device)
    return model.eval().requires_grad_(False)


def read_state(
    folder: Path,
    files: dict[str, Path],
    expected: dict[str, tuple[int, ...]],
    plan: QuantizationPlan | None,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The state dict to assign: the files' tensors as mapped (converted only where `dtype` or
    `device` differ), and the quantized modules' codes and scales."""
    state: dict[str, torch.Tensor] = {}
    to_quantize = dict(plan.weights) if plan else {}
    if plan and (folder / BLOCKS_FILE).is_file():
        state.update(prequantized(folder / BLOCKS_FILE, to_quantize))
    for path in sorted(set(files.values())):
        for name, tensor in mapped_tensors(path).items():
            if name in to_quantize:
                state.update(to_quantize[name].quantize(tensor))
            elif name in expected:
                state[name] = tensor.to(device=device, dtype=dtype)  # no copy when they already match
    return {name: tensor.to(device) for name, tensor in state.items()}


def prequantized(path: Path, to_quantize: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The quantized tensors `path` holds (see `BLOCKS_FILE`) for the weights in `to_quantize` that
    it covers, which are taken off `to_quantize`; the rest are left to be quantized at load time.

    Its 4-bit blocks serve 8-bit modules too, unpacked (the same grid, one code a byte).
    """
    tensors = mapped_tensors(path)
    state = {}
    for name, target in list(to_quantize.items()):
        keys = [f"{target.module}.{key}" for key in ("codes", "scale", "offset")]
        if not all(key in tensors for key in keys):
            continue
        codes, scale, offset = (tensors[key] for key in keys)
        packed = codes.shape[-1] * 2 == GROUP_SIZE
        if target.bits == 8 and packed:
            codes = torch.cat((codes & 15, codes >> 4), dim=-1)
        elif (target.bits == 4) != packed:
            continue
        state.update(zip(keys, (codes, scale, offset)))
        del to_quantize[name]
    return state
