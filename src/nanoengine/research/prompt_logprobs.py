"""Every token of a token list scored at once, with the likeliest alternatives at each position.

What OpenAI's `echo` with `logprobs: N` answers, and what an evaluation harness's log-likelihood
requests need (the log-probability of a continuation, and whether greedy decoding would have
produced it). The sequences are run as `scoring.py` runs texts: grouped by length
(`scoring.length_batches`), right-padded, one forward pass per group without a KV cache; with no
alternatives asked, the pass is `runner.sequence_logprobs` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.runner import next_token_logits, sequence_logprobs
from .scoring import DEFAULT_BATCH_TOKENS, length_batches


@dataclass(frozen=True)
class TokenListScores:
    """One sequence's scores. Index i is about `token_ids[i + 1]`, predicted from the tokens before it
    (the first token has no context and no score): `token_logprobs[i]` is its natural log-probability,
    `top[i]` the `top_n` likeliest (token id, log-prob) pairs at that position, likeliest first."""

    token_ids: list[int]
    token_logprobs: list[float]
    top: list[list[tuple[int, float]]]

    def greedy(self, start: int) -> bool:
        """Whether every token from `token_ids[start]` on is the likeliest at its position (needs top_n >= 1)."""
        return all(top[0][0] == token for top, token in zip(self.top[start - 1 :], self.token_ids[start:]))


def score_token_lists(
    model: torch.nn.Module, sequences: list[list[int]], top_n: int = 0, batch_tokens: int = DEFAULT_BATCH_TOKENS
) -> list[TokenListScores]:
    """Score each sequence of token ids (see `TokenListScores`), in the order given; each must
    fit the model's context. `batch_tokens` bounds the padded tokens of one forward pass."""
    results: list[TokenListScores | None] = [None] * len(sequences)
    for batch in length_batches([len(ids) for ids in sequences], batch_tokens):
        rows = [sequences[i] for i in batch]
        if top_n:
            scored = _logprobs_and_top(model, rows, top_n)
        else:
            scored = [(values, [[] for _ in values]) for values in sequence_logprobs(model, rows)]
        for index, (values, top) in zip(batch, scored):
            results[index] = TokenListScores(sequences[index], values, top)
    return results  # type: ignore[return-value]


def _logprobs_and_top(
    model: torch.nn.Module, sequences: list[list[int]], top_n: int
) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """`runner.sequence_logprobs`'s values, and from the same logits each position's `top_n` likeliest
    tokens (their log-probs computed the same way, so a greedy token's two values are equal)."""
    ids, logits = next_token_logits(model, sequences)  # (B, T), (B, T-1, V)
    with torch.inference_mode():
        norm = logits.logsumexp(-1)  # (B, T-1)
        values = (logits.gather(-1, ids[:, 1:, None])[..., 0] - norm).cpu()  # (B, T-1)
        best, best_ids = logits.topk(min(top_n, logits.shape[-1]), dim=-1)  # (B, T-1, N)
        best = (best - norm[..., None]).cpu()
        best_ids = best_ids.cpu()
    out = []
    for row, seq in enumerate(sequences):
        n = len(seq) - 1
        top = [list(zip(best_ids[row, t].tolist(), best[row, t].tolist())) for t in range(n)]
        out.append((values[row, :n].tolist(), top))
    return out
