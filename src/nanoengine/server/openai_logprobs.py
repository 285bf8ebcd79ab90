"""Log-probabilities in OpenAI's two shapes: the legacy completions object and the chat `content` list.

Each token, echoed from the prompt or generated, is first a `ScoredToken` (its text, its
log-probability, the likeliest alternatives at its position), then shaped. As the API defines
them: the prompt's first token has no log-probability (`null`, and `null` alternatives);
completions' `top_logprobs` maps the `logprobs` likeliest tokens' texts to their log-probs, plus
the chosen token (so up to N + 1 entries), and `text_offset` is each token's character offset in
the choice's text; chat's `top_logprobs` lists exactly the `top_logprobs` likeliest, with `bytes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..api.outputs import top_logprobs_of
from ..api.types import TokenOutput
from ..research.prompt_logprobs import TokenListScores


@dataclass(frozen=True)
class ScoredToken:
    text: str
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: list[tuple[str, float]] | None  # the likeliest alternatives' texts and log-probs, likeliest first


def echoed_tokens(scores: TokenListScores, decode: Callable[[int], str]) -> list[ScoredToken]:
    """A prompt's tokens as scored in one pass (`research.prompt_logprobs`)."""
    ids = scores.token_ids
    first = ScoredToken(decode(ids[0]), None, None)
    rest = [
        ScoredToken(decode(token), logprob, [(decode(a), value) for a, value in top])
        for token, logprob, top in zip(ids[1:], scores.token_logprobs, scores.top)
    ]
    return [first, *rest]


def generated_tokens(tokens: list[TokenOutput], decode: Callable[[int], str]) -> list[ScoredToken]:
    """Generated tokens, with the alternatives the engine reported beside each (when asked)."""
    return [
        ScoredToken(t.token, t.log_prob, [(decode(a), value) for a, value in top_logprobs_of(t) or []])
        for t in tokens
    ]


def completion_logprobs(tokens: list[ScoredToken], first_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; offsets count from `first_offset` (where these tokens' text starts)."""
    offsets, offset = [], first_offset
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [_top_dict(t) for t in tokens],
        "text_offset": offsets,
    }


def _top_dict(token: ScoredToken) -> dict[str, float] | None:
    if token.logprob is None:
        return None
    top = dict(token.top or [])
    top.setdefault(token.text, token.logprob)  # the chosen token is always there, after the likeliest
    return top


def chat_logprobs(tokens: list[ScoredToken]) -> dict[str, Any]:
    """The chat shape: per token its text, log-prob, UTF-8 bytes and the likeliest alternatives."""

    def entry(text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [{**entry(t.text, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top or []]} for t in tokens]
    return {"content": content, "refusal": None}
