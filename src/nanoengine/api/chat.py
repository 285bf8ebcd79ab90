"""Chat: a list of messages, rendered with the checkpoint's own chat template, then completed.

One code path for every chat surface: `llm.chat()`, the CLI's `complete --chat` and `chat`, and
the server's OpenAI-style `/v1/chat/completions` all turn messages into a prompt with
`chat_prompt()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameterError

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer

Message = dict[str, str]


def validate_messages(messages: Any) -> list[Message]:
    """The messages as plain `{"role", "content"}` dicts, or an `InvalidParameterError` naming the fault.

    `content` may also be a list of OpenAI-style text parts (`{"type": "text", "text": ...}`),
    which are joined with newlines, as vLLM does for templates that expect a string.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidParameterError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, not {_describe(messages)}"
        )
    return [_message(i, message) for i, message in enumerate(messages)]


def _message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidParameterError(f"{where} must be a dict with 'role' and 'content', not {_describe(message)}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role.strip():
        raise InvalidParameterError(f"{where}['role'] must be a non-empty string such as 'user', not {role!r}")
    if isinstance(content, (list, tuple)):
        content = "\n".join(_text_part(f"{where}['content'][{i}]", part) for i, part in enumerate(content))
    if not isinstance(content, str):
        raise InvalidParameterError(f"{where}['content'] must be a string, not {_describe(content)}")
    return {"role": role, "content": content}


def _text_part(where: str, part: Any) -> str:
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    raise InvalidParameterError(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported, not {kind!r}")


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else f"{type(value).__name__} {value!r}"[:80]


def chat_prompt(tokenizer: Tokenizer, messages: Any) -> str:
    """The prompt for the assistant's next message, ready to be completed.

    A template that writes the BOS token itself (Llama 3, Mistral, Gemma) would get a second one
    from a tokenizer that adds it on encoding; it is left to the tokenizer, so the prompt's tokens
    are exactly transformers' `apply_chat_template(..., tokenize=True)`.
    """
    prompt = tokenizer.apply_chat_template(validate_messages(messages), add_generation_prompt=True)
    bos = tokenizer.special_tokens.get("bos_token")
    if bos and prompt.startswith(bos) and tokenizer.adds_bos_token:
        prompt = prompt[len(bos) :]
    return prompt
