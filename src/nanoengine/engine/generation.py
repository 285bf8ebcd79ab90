"""The token loop for one sequence: prefill the prompt once, then decode one token at a time.

It is the engine's runner driven for one row (the same cache buckets, the same compiled steps
when `compiling.compile_steps(model)` asked for them), written as a short loop to read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError
from ..model.decoder import CausalLM
from .runner import LENGTH_BUCKET, ModelRunner
from .sampling import Sampler, SamplingParams
from .scheduler import PrefillBatch, Sequence


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
    needed = len(prompt_ids) + max_new_tokens  # one row of this length, rounded up so similar requests share shapes
    runner = ModelRunner(model, 1, min(-(-needed // LENGTH_BUCKET) * LENGTH_BUCKET, model.config.max_position_embeddings))
    sampler = Sampler(sampling, model.config.vocab_size, runner.device)
    seq = Sequence(prompt_ids, max_new_tokens, deadline=float("inf"))
    logits = runner.prefill(PrefillBatch(0, [seq], [prompt_ids]))[0]  # (V,)
    seq.pos = len(prompt_ids)
    for step in range(max_new_tokens):
        token, logprob = sampler(logits)
        seq.next_token = int(token)  # the one host sync per step: the caller needs the id
        yield GeneratedToken(seq.next_token, float(logprob))
        if seq.next_token in stop_ids or step == max_new_tokens - 1:
            return
        logits = runner.decode([seq])[0]  # (V,)
        seq.pos += 1
