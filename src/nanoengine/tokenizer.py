"""Text to token ids and back, from a checkpoint's `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from .errors import CheckpointError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper over the `tokenizers` library.

    Encoding follows `tokenizer.json` exactly: special-token strings in the text become their
    tokens, and a BOS token is added only if the file's post-processor adds one.
    """

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None) -> None:
        self.backend = backend
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"no tokenizer.json in {Path(folder)}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise CheckpointError(f"{path} is not a valid tokenizer file: {err}") from None
        settings = Path(folder) / "tokenizer_config.json"
        template = json.loads(settings.read_text(encoding="utf-8")).get("chat_template") if settings.is_file() else None
        return cls(backend, template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages into a prompt with the checkpoint's own Jinja template."""
        if self.chat_template is None:
            raise CheckpointError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # jinja2 comes with torch

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A token may end in the middle of a multi-byte character; its decoded text then ends in
    U+FFFD. Such a tail is held back until a later token completes it. Decoding always restarts a
    few tokens back (at `prefix_offset`) rather than at the last token alone, because decoders
    that strip or merge spaces give a different text for a token seen on its own.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window that is re-decoded
        self.read_offset = 0  # end of the tokens whose text has been emitted

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        current = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(current) <= len(emitted) or current.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return current[len(emitted) :]

    def flush(self) -> str:
        """The text held back, once no token will follow, less the last character if incomplete.

        A held-back token can carry whole characters before its incomplete one (a space and the
        first bytes of a character can be one token): those are returned, the rest is dropped.
        """
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        current = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(emitted) :].removesuffix(REPLACEMENT_CHAR)
