"""The prompts of an OpenAI request, as text and as the token ids the model reads.

A completions prompt is a string, a list of token ids (as evaluation harnesses send it, so that
the server scores exactly the tokens they counted), or a non-empty list of either; a chat's prompt
is its messages rendered by the checkpoint's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.chat import chat_prompt
from ..api.models import LoadedModel
from ..model.tokenizer import Tokenizer
from .openai_errors import OpenAIError


@dataclass(frozen=True)
class Prompt:
    """One prompt as given (text, or token ids decoded to text) and the token ids the model reads."""

    text: str
    ids: list[int]


def chat_prompt_and_room(loaded: LoadedModel, messages: Any) -> tuple[list[Prompt], int]:
    """The chat's prompt, and how many tokens the engine's longest sequence leaves after it."""
    prompt = chat_prompt(loaded.tokenizer, messages)
    ids = loaded.tokenizer.encode(prompt)
    room = loaded.engine.max_seq_len - len(ids)
    return [Prompt(prompt, ids)], max(room, 1)  # a prompt that fills the context is refused by the completion, by name


def completion_prompts(tokenizer: Tokenizer, prompt: Any) -> list[Prompt]:
    """The prompts of a completions request: a string, a list of token ids, or a non-empty list of either."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise OpenAIError(400, "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    prompts = []
    for i, item in enumerate(prompt):
        if isinstance(item, str) and item:
            prompts.append(Prompt(item, tokenizer.encode(item)))
        elif _is_token_ids(item) and item:
            if not all(0 <= t < tokenizer.vocab_size for t in item):
                raise OpenAIError(400, f"prompt[{i}] holds token ids outside [0, {tokenizer.vocab_size})", "prompt")
            prompts.append(Prompt(tokenizer.decode(item, skip_special_tokens=False), list(item)))
        else:
            raise OpenAIError(400, f"prompt[{i}] must be a non-empty string or list of token ids, not {item!r}", "prompt")
    return prompts


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


