"""Text to token ids and back, from a checkpoint's `tokenizer.json`."""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from ..errors import CheckpointError, InvalidParameterError

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# The named special tokens that transformers hands to a chat template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A thin wrapper over the `tokenizers` library.

    Encoding follows `tokenizer.json` exactly: special-token strings in the text become their
    tokens, and a BOS token is added only if the file's post-processor adds one.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"no tokenizer.json in {folder}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise CheckpointError(f"{path} is not a valid tokenizer file: {err}") from None
        settings = _read_json(folder / "tokenizer_config.json")
        special = {**special_tokens_of(_read_json(folder / "special_tokens_map.json")), **special_tokens_of(settings)}
        return cls(backend, read_chat_template(folder, settings), special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def adds_bos_token(self) -> bool:
        """Whether encoding puts the BOS token in front by itself (the file's post-processor)."""
        bos = self.special_tokens.get("bos_token")
        ids = self.encode("")
        return bos is not None and bool(ids) and ids[0] == self.token_to_id(bos)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages into a prompt with the checkpoint's own Jinja template.

        Renders as transformers' `apply_chat_template(..., tokenize=False)` does: the same sandboxed
        Jinja environment and variables (`messages`, `add_generation_prompt`, the special tokens,
        `raise_exception`, `strftime_now`; no tools). A template that rejects the messages through
        `raise_exception` (e.g. "roles must alternate") raises `InvalidParameterError`.
        """
        if self.chat_template is None:
            raise CheckpointError(
                "this checkpoint has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)"
            )
        import jinja2.sandbox

        template = compile_chat_template(self.chat_template)
        try:
            return template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except TemplateRejection as err:
            raise InvalidParameterError(f"messages: the chat template rejects them: {err}") from None
        except jinja2.sandbox.SecurityError as err:
            raise CheckpointError(f"the checkpoint's chat template tried something unsafe: {err}") from None
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            raise InvalidParameterError(f"messages: the chat template failed on them: {err}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(settings).__name__}")
    return settings


def special_tokens_of(settings: dict[str, Any]) -> dict[str, str]:
    """The named special tokens in a tokenizer config, each a string or an AddedToken's `content`."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = settings.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def read_chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    """The checkpoint's default chat template, where transformers looks for it.

    `chat_template.jinja` (what transformers 5 writes) comes first; else `tokenizer_config.json`'s
    `chat_template`, either a string or a list of `{"name", "template"}` of which the one named
    `default` is used (the others serve tools or retrieval, which nanoengine does not pass).
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            logger.warning("%s: no chat template named 'default' among %s", folder, sorted(map(str, named)))
        template = named.get("default")
    return template if isinstance(template, str) else None


class TemplateRejection(Exception):
    """Raised by a chat template's own `raise_exception(message)`."""


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """A chat template compiled in a sandbox set up as transformers sets it up.

    Chat templates come with checkpoints, so they are untrusted code: the immutable sandbox keeps
    them from reaching Python internals or changing their inputs.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRejection(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not have.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise CheckpointError(f"the checkpoint's chat template is not valid Jinja: {err}") from None


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
