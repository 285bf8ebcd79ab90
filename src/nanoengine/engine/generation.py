"""The token loop: prefill the prompt once, then decode one token at a time from the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError
from ..model.decoder import CausalLM, KVCache
from .sampling import Sampler, SamplingParams

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so similar requests share shapes


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    logprob: float  # under the model's own distribution, before temperature and filters


def check_lengths(model: CausalLM, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any work, a request that cannot fit the model's context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InvalidParameterError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
    if prompt_len == 0:
        raise InvalidParameterError("the prompt must have at least one token")
    context = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > context:
        raise InvalidParameterError(
            f"prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {context} tokens"
        )


def cache_length(needed: int, context: int) -> int:
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, context)


@torch.inference_mode()
def _forward_last(model: CausalLM, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(ids, input_pos, cache, last_only=True)[0, -1]  # (V,)


def generate(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_ids: Iterable[int] | None = None,
) -> Iterator[GeneratedToken]:
    """Yield the tokens that follow `prompt_ids`, each with its log-probability.

    Stops after `max_new_tokens`, or after yielding an end-of-sequence token (the model's own
    EOS ids unless `eos_ids` is given; pass `()` to never stop early). Closing the iterator stops
    the work at once: nothing runs between two `next()` calls.
    """
    check_lengths(model, len(prompt_ids), max_new_tokens)
    return _generate(model, prompt_ids, max_new_tokens, sampling or SamplingParams(), eos_ids)


def _generate(model, prompt_ids, max_new_tokens, sampling, eos_ids) -> Iterator[GeneratedToken]:
    if max_new_tokens == 0:
        return
    stop_ids = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    device = model.lm_head.weight.device
    cache = KVCache(
        model.config,
        batch_size=1,
        max_len=cache_length(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings),
        dtype=model.compute_dtype,
        device=device,
    )
    sampler = Sampler(sampling, model.config.vocab_size, device)
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    logits = _forward_last(model, ids, torch.arange(len(prompt_ids), device=device), cache)  # (V,)
    for step in range(max_new_tokens):
        token, logprob = sampler(logits)
        token_id = int(token)  # the one host sync per step: the caller needs the id
        yield GeneratedToken(token_id, float(logprob))
        if token_id in stop_ids or step == max_new_tokens - 1:
            return
        pos = torch.tensor([len(prompt_ids) + step], device=device)  # (1,)
        logits = _forward_last(model, token.view(1, 1), pos, cache)
