"""Checks of the `nanoengine` command's options, all made before any model is fetched or loaded.

Most are argparse `type=` functions, so that a bad value is a one-line usage error naming the
option (exit code 2), as argparse reports its own.
"""

from __future__ import annotations

import argparse
import math
import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from ..errors import InvalidParameterError

API_KEY_ENV = "NANOENGINE_API_KEY"


def nanoengine_version() -> str:
    try:
        return package_version("nanoengine")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def port_number(text: str) -> int:
    port = _integer(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 picks a free one), not {text}")
    return port


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, not {text}")
    return value


def api_key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave the option out to serve without a key)")
    return text


def dtype_name(text: str) -> str:
    from ..weights.loading import resolve_dtype

    try:
        resolve_dtype(text)
    except InvalidParameterError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("dtype ")) from None
    return text


def device_name(text: str) -> str:
    from ..weights.loading import resolve_device

    try:
        resolve_device(text)
    except InvalidParameterError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("device ")) from None
    return text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None


def api_key_from_environment() -> str | None:
    """`$NANOENGINE_API_KEY`; set but empty is an error, not "no key"."""
    if API_KEY_ENV not in os.environ:
        return None
    if not os.environ[API_KEY_ENV].strip():
        raise InvalidParameterError(f"${API_KEY_ENV} is set but empty: unset it to serve without a key")
    return os.environ[API_KEY_ENV]


def add_sampling_options(command: argparse.ArgumentParser, names: tuple[str, ...], **defaults: Any) -> None:
    """`--max-new-tokens`, `--temperature`, ...: each built from its completion parameter's CLI
    spelling (`params.py`); `defaults` overrides a command's defaults."""
    from ..params import SPECS

    for name in names:
        keywords = dict(SPECS[name].cli)
        flag = keywords.pop("flag", option_flag(name))
        keywords["default"] = defaults.get(name, keywords.get("default"))
        if keywords["default"] is not None:
            keywords["help"] += " (default: %(default)s)"
        command.add_argument(flag, dest=name, **keywords)


def option_flag(name: str) -> str:
    from ..params import SPECS

    return (SPECS[name].cli or {}).get("flag", "--" + name.replace("_", "-"))


def check_sampling_options(model: str, prompt: str, sampling: dict[str, Any]) -> None:
    """A command's sampling options and prompt, checked as `Completion.create` checks them, named as options."""
    from ..params import CompletionParams

    try:
        CompletionParams(model_name=model, prompt=prompt, **sampling)
    except InvalidParameterError as err:
        name = next((n for n in sampling if str(err).startswith(n)), None)
        raise InvalidParameterError(str(err).replace(name, option_flag(name), 1) if name else str(err)) from None


def check_chat_template(model: str) -> None:
    """`--chat` needs a chat template: look for it in the checkpoint's files, before loading the weights."""
    from ..weights.registry import resolve_model
    from ..model.tokenizer import Tokenizer

    if Tokenizer.from_folder(resolve_model(model)).chat_template is None:
        raise InvalidParameterError(f"--chat: {model} has no chat template; leave --chat out to complete raw text")


def add_model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--dtype",
        type=dtype_name,
        help="float32, bfloat16, float16, int8 or int4 (weight-only, blocks of 32) or auto (default: float32 on "
        "CPU, bfloat16 on CUDA); on CPU, half and quantized weights are only faster with --compile",
    )
    command.add_argument("--device", type=device_name, help="cpu, cuda or auto (default: cpu)")
    command.add_argument(
        "--compile", action="store_true", help="compile the decode step (faster decoding; costs start-up time)"
    )


def configure_model_options(args: argparse.Namespace) -> None:
    from ..api.models import configure

    configure(dtype=args.dtype, device=args.device, compile=args.compile or None)


def add_engine_options(command: argparse.ArgumentParser) -> None:
    """How each model's engine is sized (see `nanoengine.configure`); defaults from $NANOENGINE_*."""
    from ..engine.loop import EngineSettings

    defaults = EngineSettings()
    option = command.add_argument
    option(
        "--max-batch-size", type=positive_int, metavar="N",
        help=f"most sequences decoding together: rows of the KV cache pool, allocated once; more requests "
        f"wait in line (default: $NANOENGINE_MAX_BATCH_SIZE, else {defaults.max_batch_size})",
    )  # fmt: skip
    option(
        "--max-seq-len", type=positive_int, metavar="TOKENS",
        help=f"longest prompt plus new tokens one row holds, at most the model's context "
        f"(default: $NANOENGINE_MAX_SEQ_LEN, else {defaults.max_seq_len})",
    )  # fmt: skip
    option(
        "--prefill-chunk", type=positive_int, metavar="TOKENS",
        help=f"prompt tokens prefilled per step: bounds how long a new prompt delays the running streams "
        f"(default: $NANOENGINE_PREFILL_CHUNK, else {defaults.prefill_chunk})",
    )  # fmt: skip
    option(
        "--no-background-compile", dest="background_compile", action="store_false", default=None,
        help="stay eager: do not compile the one-sequence decode step in the background once the server "
        "has decoded a few hundred tokens (default: $NANOENGINE_BACKGROUND_COMPILE, else on)",
    )  # fmt: skip


def configure_engine(args: argparse.Namespace) -> None:
    from ..api.models import configure

    configure(
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
        background_compile=args.background_compile,
    )  # fmt: skip
