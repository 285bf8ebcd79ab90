"""Choosing the next token from the logits: greedy, or temperature with top-k/top-p and penalties;
and, for the rows that ask, the likeliest alternatives (OpenAI's `top_logprobs`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..params import CompletionParams, check


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy; the rest only matter when sampling,
    except the penalties, which shift the logits in both cases (OpenAI/vLLM meaning: subtract
    `presence_penalty` once from every token already generated, and `frequency_penalty` once per
    time it was generated)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "seed"):
            check(name, getattr(self, name))  # the ranges are the completion parameters' own

    @classmethod
    def of(cls, request: CompletionParams) -> SamplingParams:
        """A completion's way of picking tokens."""
        r = request
        return cls(r.temperature, r.top_k, r.top_p, r.presence_penalty, r.frequency_penalty, r.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One sequence's sampling state: its parameters, its own random generator (so that a seeded
    sequence draws the same tokens whatever shares its batch), and the token counts the
    penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        needs_counts = params.presence_penalty or params.frequency_penalty
        self.counts = torch.zeros(vocab_size, device=device) if needs_counts else None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a token from `logits` (V,); return it and its log-probability under the model."""
        tokens, logprobs = sample([self], logits[None])
        return tokens[0], logprobs[0]

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            return logits
        p = self.params
        return logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()


@torch.inference_mode()
def sample(samplers: list[Sampler], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of `logits` (B, V), row b with `samplers[b]`'s parameters.

    Greedy and sampled rows share the batch. Returns the tokens (B,) and their log-probabilities
    under the model's own distribution (log_softmax of the raw logits, whatever the temperature
    and filters).
    """
    logits = logits.float()  # (B, V)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    shaped = torch.stack([s.penalize(row) for s, row in zip(samplers, logits)]) if _any_counts(samplers) else logits
    tokens = torch.argmax(shaped, dim=-1)  # (B,): right for the greedy rows
    sampled = [b for b, s in enumerate(samplers) if not s.params.greedy]
    if sampled:
        probs = _filtered_probs(shaped[sampled], [samplers[b].params for b in sampled])  # (S, V)
        for row, b in enumerate(sampled):
            tokens[b] = torch.multinomial(probs[row], 1, generator=samplers[b].generator)[0]
    for s, token in zip(samplers, tokens):
        if s.counts is not None:
            s.counts[token] += 1
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


@torch.inference_mode()
def top_alternatives(logits: torch.Tensor, counts: list[int]) -> list[list[tuple[int, float]]] | None:
    """Row b's `counts[b]` likeliest tokens in `logits` (B, V), likeliest first, with their
    log-probabilities under the model, computed as `sample` computes the chosen token's (so the two
    agree exactly); None, with no work done, when no row asks."""
    if not any(counts):
        return None
    asked = [b for b, n in enumerate(counts) if n]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[asked]  # (A, V)
    values, ids = logprobs.topk(min(max(counts), logprobs.shape[-1]), dim=-1)  # (A, N), descending
    rows: list[list[tuple[int, float]]] = [[] for _ in counts]
    for row, b in enumerate(asked):
        rows[b] = list(zip(ids[row, : counts[b]].tolist(), values[row, : counts[b]].tolist()))
    return rows


def _any_counts(samplers: list[Sampler]) -> bool:
    return any(s.counts is not None for s in samplers)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sampling probabilities (S, V) after temperature, top_k and top_p, each row its own.

    Logits are shifted so their maximum is 0 before dividing by the temperature, so that a tiny
    temperature sends the others to -inf (greedy in effect) instead of overflowing to inf - inf.
    Filters are worked out on sorted rows but applied in token order, so that a row's draw from
    its generator picks the same token whatever the other rows of the batch ask for.
    """
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]  # (S, 1)
    temperature = temperature.clamp_min(torch.finfo(torch.float32).tiny)  # one that rounds to 0 too
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature  # (S, V), <= 0
    filtering = [i for i, p in enumerate(params) if p.top_k not in (None, -1) or p.top_p not in (None, 1.0)]
    if filtering:
        drop = torch.zeros_like(scaled, dtype=torch.bool)  # (S, V)
        drop[filtering] = _dropped(scaled[filtering], [params[i] for i in filtering])
        scaled = scaled.masked_fill(drop, -math.inf)
    return torch.softmax(scaled, dim=-1)


def _dropped(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Which tokens (F, V) top_k, then top_p, leave out; the most likely token always stays."""
    V = scaled.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k not in (None, -1) else V for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in params], device=scaled.device, dtype=torch.float64)
    ordered, order = torch.sort(scaled, dim=-1, descending=True)  # (F, V)
    drop = torch.arange(V, device=scaled.device)[None, :] >= top_k[:, None]  # beyond the k best
    probs = torch.softmax(ordered.masked_fill(drop, -math.inf), dim=-1)
    # Drop a token when the tokens before it already reach top_p (compared in float64, so that a
    # top_p below float32's range still keeps something).
    drop |= (torch.cumsum(probs, dim=-1) - probs).double() >= top_p[:, None]
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, drop)  # back in token order
