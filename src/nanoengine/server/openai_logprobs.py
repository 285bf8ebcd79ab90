"""Log-probabilities in OpenAI's two shapes: the legacy completions object and the chat `content` list.

Each token, echoed from the prompt or generated, is first a `ScoredToken` (its text, its
log-probability, the likeliest alternatives at its position), then shaped. As the API defines
them: the prompt's first token has no log-probability (`null`, and `null` alternatives);
completions' `top_logprobs` maps the `logprobs` likeliest tokens' texts to their log-probs, plus
the chosen token (so up to N + 1 entries), and `text_offset` is each token's character offset in
the choice's text; chat's `top_logprobs` lists exactly the `top_logprobs` likeliest, and `bytes`
are each token's own bytes (a token that ends mid-character has text ending in U+FFFD, and the
bytes it really holds).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import decoders

from ..api.outputs import token_id_of, top_logprobs_of
from ..api.types import TokenOutput
from ..model.tokenizer import Tokenizer
from ..research.prompt_logprobs import TokenListScores

REPLACEMENT_CHAR = "\ufffd"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
Describe = Callable[[int], tuple[str, bytes]]  # token id -> its text and its bytes


@dataclass(frozen=True)
class ScoredToken:
    text: str
    raw: bytes  # the token's own bytes
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: list[tuple[str, bytes, float]] | None  # the likeliest alternatives, likeliest first


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """A token's bytes: its text's, unless the text holds U+FFFD for part of a character; then the
    bytes behind its vocabulary entry (byte-level BPE's characters, or SentencePiece's `<0xNN>`)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    piece = tokenizer.backend.id_to_token(token_id)
    if REPLACEMENT_CHAR not in text or piece is None:
        return text.encode()
    if byte := BYTE_PIECE.fullmatch(piece):
        return bytes([int(byte[1], 16)])
    table = _byte_level_chars()
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel) and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return text.encode()


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the others for 256 + n."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


def echoed_tokens(scores: TokenListScores, describe: Describe) -> list[ScoredToken]:
    """A prompt's tokens as scored in one pass (`research.prompt_logprobs`)."""
    ids = scores.token_ids
    first = ScoredToken(*describe(ids[0]), None, None)
    rest = [
        ScoredToken(*describe(token), logprob, [(*describe(a), value) for a, value in top])
        for token, logprob, top in zip(ids[1:], scores.token_logprobs, scores.top)
    ]
    return [first, *rest]


def generated_tokens(tokens: list[TokenOutput], describe: Describe) -> list[ScoredToken]:
    """Generated tokens, with the alternatives the engine reported beside each (when asked)."""
    return [
        ScoredToken(
            t.token, describe(token_id_of(t))[1] if token_id_of(t) is not None else t.token.encode(), t.log_prob,
            [(*describe(a), value) for a, value in top_logprobs_of(t) or []],
        )  # fmt: skip
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
    top = {text: logprob for text, _, logprob in token.top or []}
    top.setdefault(token.text, token.logprob)  # the chosen token is always there, after the likeliest
    return top


def chat_logprobs(tokens: list[ScoredToken]) -> dict[str, Any]:
    """The chat shape: per token its text, log-prob, UTF-8 bytes and the likeliest alternatives."""

    def entry(text: str, raw: bytes, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**entry(t.text, t.raw, t.logprob), "top_logprobs": [entry(*a) for a in t.top or []]} for t in tokens]
    return {"content": content, "refusal": None}
