"""Traces: one forward pass with every activation kept, and the logit lens over them.

`trace(llm, prompt)` runs the prompt once and records, at the points named in
`interventions.py`, what flowed through the model: the residual stream after every layer, what
each attention block and MLP added to it, each head's output, the attention probabilities
(computed explicitly only while traced; the normal path keeps SDPA), and the logits. With
`interventions=`, the trace records the changed run.

Everything recorded is kept in float32 on the CPU, whatever the model's dtype and device.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidParameterError
from .interventions import Intervention, Layout, ablate_heads, intervene, resolve_points

__all__ = ["LogitLens", "Trace", "ablate_heads", "intervene", "trace", "unembed"]


def unembed(model: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """Logits from a residual stream (..., hidden): the final norm and the family's own head."""
    norm = dict(model.named_modules())[Layout.of(model).final_norm]
    return model.logits_of(norm(residual))


@dataclass(frozen=True, repr=False)
class LogitLens:
    """The top-k next tokens at every layer and position, read off the residual stream.

    Row i is the output of layer i (`model.layers.{i}`) put through the final norm and the head,
    as if the model stopped there; the last row is the model's own prediction.
    """

    input_tokens: list[str]  # the prompt's tokens, one per position
    token_ids: torch.Tensor  # (layers, T, k)
    tokens: list[list[list[str]]]  # [layer][position][rank]
    probs: torch.Tensor  # (layers, T, k)

    def __repr__(self) -> str:
        layers, positions, k = self.token_ids.shape
        return f"LogitLens({layers} layers x {positions} positions, top {k}; print it for the table)"

    def __str__(self) -> str:
        return self.table()

    def first_layer(self, token: str | int, position: int = -1) -> int | None:
        """The first layer from which `token` (a string or an id) stays the top prediction at
        `position` to the last layer; None if the model's own prediction is something else."""
        top = self.token_ids[:, position, 0].tolist()
        wanted = token if isinstance(token, int) else None
        hits = [(t == wanted) if wanted is not None else (s == token) for t, s in zip(top, self.top_tokens(position))]
        if not hits[-1]:
            return None
        layer = len(hits) - 1
        while layer > 0 and hits[layer - 1]:
            layer -= 1
        return layer

    def top_tokens(self, position: int = -1) -> list[str]:
        """The top prediction of every layer at `position`."""
        return [layer[position][0] for layer in self.tokens]

    def table(self, last: int | None = None) -> str:
        """A text table: one row per layer, one column per position (the last `last` ones), each cell
        the top token and its probability."""
        positions = range(len(self.input_tokens))[-last:] if last else range(len(self.input_tokens))
        header = ["layer"] + [repr(self.input_tokens[p]) for p in positions]
        rows = [
            [str(layer)] + [f"{self.tokens[layer][p][0]!r} {self.probs[layer, p, 0]:.2f}" for p in positions]
            for layer in range(len(self.tokens))
        ]
        widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


@dataclass(repr=False)
class Trace:
    """What one forward pass of a prompt computed. Shapes: T tokens, n layers, C hidden size."""

    token_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    activations: dict[str, torch.Tensor]  # point name -> the tensor there, batch dimension kept
    embeddings: torch.Tensor  # (T, C): the input of the first layer
    logits: torch.Tensor  # (T, V)
    layout: Layout = field(repr=False)
    model: nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False)

    def __repr__(self) -> str:
        layout = self.layout
        return f"Trace({self.tokens!r}, {layout.num_layers} layers, {layout.num_heads} heads)"

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor recorded at a point, shaped as an intervention there receives it (batch of 1)."""
        if name not in self.activations:
            resolve_points(self.model, [name])  # an unknown name gets the full explanation
            recorded = ", ".join(point for point in self.activations if point.startswith(self.layout.layer(0) + "."))
            raise InvalidParameterError(
                f"point {name!r} is not recorded by a trace; it records each layer's output and {recorded}, "
                f"and {self.layout.final_norm}"
            )
        return self.activations[name]

    def _stack(self, part: str) -> torch.Tensor:
        return torch.stack([self.activations[self.layout.layer(i, part)][0] for i in range(self.layout.num_layers)])

    @property
    def layer_outputs(self) -> torch.Tensor:
        """(n, T, C): the residual stream after each layer, the last one before the final norm."""
        return self._stack("")

    @property
    def hidden_states(self) -> torch.Tensor:
        """(n + 1, T, C), as transformers' `output_hidden_states`: the embeddings, the residual stream
        after each layer but the last, and the last layer's output after the final norm."""
        final = self.activations[self.layout.final_norm][0]
        return torch.cat([self.embeddings[None], self.layer_outputs[:-1], final[None]])

    @property
    def attentions(self) -> torch.Tensor:
        """(n, heads, T, T): attention probabilities, query position by key position."""
        return self._stack(f"{self.layout.attention}.probs")

    @property
    def attention_outputs(self) -> torch.Tensor:
        """(n, T, C): what each layer's attention adds to the residual stream."""
        return self._stack(self.layout.attention_added)

    @property
    def mlp_outputs(self) -> torch.Tensor:
        """(n, T, C): what each layer's MLP adds to the residual stream."""
        return self._stack(self.layout.mlp_added)

    @property
    def head_outputs(self) -> torch.Tensor:
        """(n, heads, T, head_dim): each head's output, before the output projection."""
        return self._stack(f"{self.layout.attention}.heads")

    def attention(self, layer: int, head: int) -> torch.Tensor:
        """(T, T): one head's attention probabilities, query position by key position."""
        layer, head = self.layout.check_layer(layer), self.layout.check_head(head)
        return self.activations[self.layout.layer(layer, f"{self.layout.attention}.probs")][0, head]

    def logit_lens(self, k: int = 5) -> LogitLens:
        """The top-k next tokens and their probabilities at every layer and position."""
        if not isinstance(k, int) or k < 1:
            raise InvalidParameterError(f"k must be a positive integer, not {k!r}")
        k = min(k, self.logits.shape[-1])
        device = self.logits_device
        ids, probs = [], []
        with torch.inference_mode():
            for layer_output in self.layer_outputs:  # one layer at a time: (T, V) each
                logits = unembed(self.model, layer_output.to(device, self.compute_dtype)).float()
                top = torch.softmax(logits, dim=-1).topk(k, dim=-1)
                ids.append(top.indices.cpu())
                probs.append(top.values.cpu())
        token_ids = torch.stack(ids)  # (n, T, k)
        decode = self.tokenizer.decode
        tokens = [[[decode([i], False) for i in position] for position in layer] for layer in token_ids.tolist()]
        return LogitLens(self.tokens, token_ids, tokens, torch.stack(probs))

    def lens_probability(self, token: str | int, position: int = -1) -> torch.Tensor:
        """(n,): the probability that the logit lens gives `token` (one token: a string or an id)
        at `position`, layer by layer."""
        token_id = self.token_id(token)
        with torch.inference_mode():
            residual = self.layer_outputs[:, position].to(self.logits_device, self.compute_dtype)  # (n, C)
            return torch.softmax(unembed(self.model, residual).float(), dim=-1)[:, token_id].cpu()

    def token_id(self, token: str | int) -> int:
        """The id of `token`, given as an id or as the text of exactly one token."""
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.logits.shape[-1]:
            return token
        ids = self.tokenizer.encode(token, add_special_tokens=False) if isinstance(token, str) else []
        if len(ids) != 1:
            raise InvalidParameterError(f"{token!r} is not one token of this model's vocabulary (it encodes to {ids})")
        return ids[0]

    @property
    def logits_device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype


def recorded_points(layout: Layout) -> list[str]:
    names = [layout.final_norm]
    for i in range(layout.num_layers):
        parts = ["", layout.attention, f"{layout.attention}.heads", f"{layout.attention}.probs", layout.mlp]
        parts += [p for p in (layout.attention_added, layout.mlp_added) if p not in parts]
        names += [layout.layer(i, part) for part in parts]
    return names


@contextmanager
def recording(model: nn.Module, layout: Layout, activations: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    """Keep a float32 CPU copy of every recorded point's output, and of the first layer's input,
    from the forward passes of the calling thread only (the engine's own passes go on beside)."""
    thread = threading.get_ident()

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() == thread:
                activations[name] = output.detach().float().cpu()

        return hook

    def keep_input(module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == thread:
            inputs["embeddings"] = args[0].detach().float().cpu()

    modules = resolve_points(model, recorded_points(layout))
    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    handles.append(modules[layout.layer(0)].register_forward_pre_hook(keep_input))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prompt_ids(tokenizer: Any, prompt: str | Sequence[int], max_len: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
    else:
        raise InvalidParameterError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
    if not ids:
        raise InvalidParameterError("prompt is empty: it has no tokens to trace")
    if len(ids) > max_len:
        raise InvalidParameterError(f"prompt has {len(ids)} tokens; the model's context is {max_len}")
    return ids


def trace(llm: Any, prompt: str | Sequence[int], interventions: Mapping[str, Intervention] | None = None) -> Trace:
    """Run `prompt` (text, or token ids) through `llm.model` once and keep every activation.

    `llm` is anything with `.model` and `.tokenizer` (the handle from `nanoengine.load`).
    `interventions` maps point names to functions that replace the tensor there (see
    `interventions.py`); the trace then records the changed run.
    """
    model, tokenizer = llm.model, llm.tokenizer
    ids = prompt_ids(tokenizer, prompt, model.config.max_position_embeddings)
    layout = Layout.of(model)
    activations: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    device = model.lm_head.weight.device
    # The interventions' hooks are registered first, so the recording sees what they return.
    intervening = intervene(model, interventions, this_thread_only=True)
    with intervening, recording(model, layout, activations, inputs), torch.inference_mode():
        logits = model(torch.tensor([ids], device=device))[0].float().cpu()  # (T, V)
    tokens = [tokenizer.decode([i], False) for i in ids]
    return Trace(ids, tokens, activations, inputs["embeddings"][0], logits, layout, model, tokenizer)
