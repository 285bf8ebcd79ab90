"""Named points in the forward pass, and interventions that read or replace the tensor there.

A point is named by its module's path in the model, which is also its checkpoint prefix, and
stands for that module's output. The points worth knowing (Llama naming; GPT-2 says
`transformer.h.{i}`, `.attn` and `.mlp`):

| point | tensor | what it is |
| --- | --- | --- |
| `model.layers.{i}` | (batch, T, hidden) | the residual stream after layer i |
| `model.layers.{i}.self_attn` | (batch, T, hidden) | the attention block's output (after `o_proj`) |
| `model.layers.{i}.self_attn.heads` | (batch, heads, T, head_dim) | each head's output, before `o_proj` |
| `model.layers.{i}.self_attn.probs` | (batch, heads, T, keys) | the attention probabilities |
| `model.layers.{i}.mlp` | (batch, T, hidden) | the MLP's output |

Any other module path (`model.layers.3.mlp.down_proj`, `model.norm`, ...) is a point too.
Gemma 3 norms each block's output before adding it to the residual stream: there,
`...self_attn` and `...mlp` are the blocks' own outputs, and what is added to the residual
stream is the output of `...post_attention_layernorm` and `...post_feedforward_layernorm`.

An intervention is a function that receives the tensor at its point and returns the tensor to
use instead, of the same shape. It sees every forward pass while it is registered, with the
batch and the tokens of that pass: a whole prompt when tracing, one token per decode step when
generating from a KV cache.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InvalidParameterError

Intervention = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Where a model family keeps its parts, as module paths."""

    layers: str  # "model.layers" or "transformer.h"
    attention: str  # the attention module's name inside a layer
    mlp: str
    attention_added: str  # the module whose output the layer adds to the residual stream
    mlp_added: str
    final_norm: str
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        config = model.config
        sizes = dict(
            num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads, head_dim=config.head_dim
        )
        return cls(**asdict(model.parts), **sizes)  # each family says where its parts are

    def layer(self, i: int, part: str = "") -> str:
        """The point name of layer i (its residual output), or of one of its parts."""
        return f"{self.layers}.{i}" + (f".{part}" if part else "")

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
            raise InvalidParameterError(
                f"layer {layer!r} is out of range: the model has {self.num_layers} layers (0-{self.num_layers - 1})"
            )
        return layer % self.num_layers

    def check_head(self, head: int) -> int:
        if not isinstance(head, int) or not -self.num_heads <= head < self.num_heads:
            raise InvalidParameterError(
                f"head {head!r} is out of range: each layer has {self.num_heads} heads (0-{self.num_heads - 1})"
            )
        return head % self.num_heads

    def describe(self, name: str) -> str:
        """The dimensions of the tensor at a point, in words, for error messages."""
        if name.endswith(".heads"):
            return "(batch, heads, tokens, head_dim)"
        if name.endswith(".probs"):
            return "(batch, heads, tokens, keys)"
        if re.fullmatch(rf"{re.escape(self.layers)}\.\d+(\.({self.attention}|{self.mlp}|\w*norm))?", name):
            return "(batch, tokens, hidden)"
        return ""


def resolve_points(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """The module behind each point name; a clear error for a name that is not a point."""
    modules = dict(model.named_modules())
    layout = Layout.of(model)
    resolved = {}
    for name in names:
        if not isinstance(name, str) or not name or name not in modules:
            raise InvalidParameterError(unknown_point_message(name, modules, layout))
        resolved[name] = modules[name]
    return resolved


def unknown_point_message(name: object, modules: Mapping[str, nn.Module], layout: Layout) -> str:
    match = re.match(rf"{re.escape(layout.layers)}\.(\d+)(\.|$)", name) if isinstance(name, str) else None
    if match and int(match.group(1)) >= layout.num_layers:
        return (
            f"no point {name!r}: layer {match.group(1)} is out of range, "
            f"the model has {layout.num_layers} layers (0-{layout.num_layers - 1})"
        )
    close = difflib.get_close_matches(name, list(modules), n=3) if isinstance(name, str) else []
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    example = layout.layer(0)
    return (
        f"no point {name!r} in this model.{hint} Points are module paths: {example} (residual stream), "
        f"{example}.{layout.attention}, {example}.{layout.attention}.heads, {example}.{layout.attention}.probs, "
        f"{example}.{layout.mlp}, ... for layers 0-{layout.num_layers - 1}"
    )


def check_interventions(model: nn.Module, interventions: Mapping[str, Intervention] | None) -> dict[str, nn.Module]:
    """Validate names and functions before any work; return the modules to hook."""
    if interventions is None:
        return {}
    if not isinstance(interventions, Mapping):
        raise InvalidParameterError(
            f"interventions must be a dict of point name -> function, not {type(interventions).__name__}"
        )
    for name, fn in interventions.items():
        if not callable(fn):
            raise InvalidParameterError(f"the intervention at {name!r} must be a function of the tensor, not {fn!r}")
    return resolve_points(model, interventions)


def replacing_hook(name: str, fn: Intervention, layout: Layout, thread: int | None = None) -> Callable:
    """A forward hook that hands the module's output to `fn` and passes on what `fn` returns
    (in every thread, or only in `thread`)."""

    def hook(module: nn.Module, args: tuple, output: object) -> torch.Tensor | None:
        if thread is not None and threading.get_ident() != thread:
            return None  # another thread's forward pass: leave it alone
        if not isinstance(output, torch.Tensor):
            raise InvalidParameterError(f"point {name!r} does not output a single tensor; intervene elsewhere")
        result = fn(output)
        if not isinstance(result, torch.Tensor) or result.shape != output.shape:
            got = f"shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else repr(type(result).__name__)
            dims = layout.describe(name)
            raise InvalidParameterError(
                f"the intervention at {name!r} returned {got}; it must return a tensor of the shape it was "
                f"given, {tuple(output.shape)}" + (f" {dims}" if dims else "")
            )
        return result.to(dtype=output.dtype, device=output.device)

    return hook


@contextmanager
def intervene(
    model: nn.Module, interventions: Mapping[str, Intervention] | None, this_thread_only: bool = False
) -> Iterator[None]:
    """Apply `interventions` (point name -> function) to every forward pass of `model` inside the block.

    Names and functions are checked before anything is registered; the hooks are removed on exit,
    whatever happens inside. They apply to every forward pass of the model in any thread (every
    row of a batch, too), or with `this_thread_only` to the passes that the calling thread runs.
    A model whose decode step is compiled does not see hooks in that step: run it eagerly.
    """
    modules = check_interventions(model, interventions)
    layout = Layout.of(model)
    thread = threading.get_ident() if this_thread_only else None
    handles = [
        module.register_forward_hook(replacing_hook(name, interventions[name], layout, thread))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablate_heads(model: nn.Module, heads: Iterable[tuple[int, int]]) -> dict[str, Intervention]:
    """Interventions that zero the output of each (layer, head), before the output projection."""
    layout = Layout.of(model)
    by_layer: dict[int, list[int]] = {}
    for pair in heads:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise InvalidParameterError(f"heads must be (layer, head) pairs, not {pair!r}")
        layer, head = layout.check_layer(pair[0]), layout.check_head(pair[1])
        by_layer.setdefault(layer, []).append(head)
    return {layout.layer(layer, f"{layout.attention}.heads"): zero_heads(chosen) for layer, chosen in by_layer.items()}


def zero_heads(heads: list[int]) -> Intervention:
    def zero(x: torch.Tensor) -> torch.Tensor:  # (B, nh, T, hd)
        x = x.clone()
        x[:, heads] = 0
        return x

    return zero
