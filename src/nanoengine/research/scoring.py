"""How likely is a text? The log-probability of each of its tokens given the ones before it.

Texts are tokenized as the checkpoint's tokenizer does by default (a BOS token only where it adds
one), sorted by length and run in right-padded batches without a KV cache (`runner.sequence_logprobs`):
attention is causal, so the padding after a text's last token changes nothing before it, and
sorting keeps the padding to a few tokens a row. A progress bar shows texts done and tokens/s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.runner import sequence_logprobs
from ..errors import InvalidParameterError
from ..progress import Progress

logger = logging.getLogger(__name__)

# Padded tokens per forward pass: on a CPU 2,048 already keep the matrix products at full speed
# (also where a pass forms all its logits at once, the top alternatives': about 400 MB); a GPU
# needs many more to be busy (`score` forms the logits a chunk at a time).
DEFAULT_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384


@dataclass(frozen=True, repr=False)
class ScoredText:
    """One text's score.

    `token_logprobs[i]` is the natural log-probability of `tokens[i + 1]` given `tokens[: i + 1]`:
    there is one fewer than there are tokens, because the first token has no context to be
    predicted from and gets no score. `logprob` is their sum and `perplexity` is
    exp(-logprob / len(token_logprobs)) (NaN for a one-token text, which has nothing scored).
    """

    text: str
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float]

    def __repr__(self) -> str:
        return (
            f"ScoredText({self.text!r}, {len(self.tokens)} tokens, logprob={self.logprob:.4f}, "
            f"perplexity={self.perplexity:.4g})"
        )

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        if not self.token_logprobs:
            return math.nan
        return math.exp(-self.logprob / len(self.token_logprobs))


def score(
    llm: Any, texts: Sequence[str], batch_tokens: int | None = None, progress: bool | None = None
) -> list[ScoredText]:
    """Score each text (see `ScoredText`), in the order given.

    `llm` is anything with `.model` and `.tokenizer` (the handle from `nanoengine.load`).
    `batch_tokens` bounds the padded tokens of one forward pass, and with it the memory of its
    activations (default: 2,048 on a CPU, 16,384 on a GPU). `progress` shows a bar (default: 16
    texts or more, on a terminal).
    """
    model, tokenizer = llm.model, llm.tokenizer
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS if model.lm_head.weight.device.type == "cpu" else GPU_BATCH_TOKENS
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise InvalidParameterError(f"batch_tokens must be a positive integer, not {batch_tokens!r}")
    encoded = encode_texts(tokenizer, texts, model.config.max_position_embeddings)
    logprobs: list[list[float]] = [[] for _ in texts]
    with Progress("score", len(texts), "text", progress, logger) as bar:
        for batch in length_batches([len(ids) for ids in encoded], batch_tokens):
            for index, values in zip(batch, sequence_logprobs(model, [encoded[i] for i in batch])):
                logprobs[index] = values
                bar.update(len(encoded[index]))
    return [
        ScoredText(text, [tokenizer.decode([i], False) for i in ids], ids, values)
        for text, ids, values in zip(texts, encoded, logprobs)
    ]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of every text, checked before any forward pass."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidParameterError(
            f"texts must be a list of strings (for one text: [text]), not {type(texts).__name__}"
        )
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidParameterError(f"texts[{i}] must be a string, not {type(text).__name__}")
        ids = tokenizer.encode(text)
        if not ids:
            raise InvalidParameterError(f"texts[{i}] is empty: it has no tokens to score")
        if len(ids) > max_len:
            raise InvalidParameterError(f"texts[{i}] has {len(ids)} tokens; the model's context is {max_len}")
        encoded.append(ids)
    return encoded


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each group's padded size (count x longest) within
    `batch_tokens` (a text longer than that goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
