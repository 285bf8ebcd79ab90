"""Choosing the next token from the logits: greedy, or temperature with top-k/top-p and penalties."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidParameterError

MAX_TEMPERATURE = 2.0


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
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_number("presence_penalty", self.presence_penalty, 0.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, 0.0, 2.0)
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (self.top_k == -1 or self.top_k >= 1):
                raise InvalidParameterError(f"top_k must be -1, None or an integer >= 1, not {self.top_k!r}")
        if self.top_p is not None:
            _check_number("top_p", self.top_p, 0.0, 1.0)
            if self.top_p == 0.0:
                raise InvalidParameterError("top_p must be in (0, 1], not 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidParameterError(f"seed must be an integer, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be a finite number in [{low}, {high}], not {value!r}")
    if not low <= value <= high:
        raise InvalidParameterError(f"{name} must be in [{low}, {high}], not {value!r}")


class Sampler:
    """Picks tokens for one sequence; holds its random generator and the counts the penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        needs_counts = params.presence_penalty or params.frequency_penalty
        self.counts = torch.zeros(vocab_size, device=device) if needs_counts else None

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a token from `logits` (V,); return it and its log-probability under the model.

        The log-probability is that of the model's own distribution (log_softmax of the raw
        logits), whatever the temperature and filters.
        """
        logits = logits.float()  # (V,)
        logprobs = torch.log_softmax(logits, dim=-1)  # (V,)
        shaped = self._penalize(logits)
        if self.params.greedy:
            token = torch.argmax(shaped)
        else:
            probs = torch.softmax(self._filter(shaped / self.params.temperature), dim=-1)  # (V,)
            token = torch.multinomial(probs, 1, generator=self.generator)[0]
        if self.counts is not None:
            self.counts[token] += 1
        return token, logprobs[token]

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            return logits
        p = self.params
        return logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()

    def _filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the top_k best tokens, then the smallest set whose probability reaches top_p."""
        top_k, top_p = self.params.top_k, self.params.top_p
        if top_k is not None and 0 < top_k < logits.shape[-1]:
            kth_best = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth_best, -math.inf)
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens before it already reach top_p; the best always stays.
            drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
        return logits
