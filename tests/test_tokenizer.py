"""The tokenizer built from the GGUF against transformers' own GGUF tokenizer, and incremental
detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from nanoengine import CheckpointError, IncrementalDetokenizer, InvalidParameterError, Tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

VARIED_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n\treturn a + b\n\n\nclass  Foo:\n    pass",
    "    four spaces,\ttab,\t\ttwo tabs,   three spaces   ",
    "Emoji: 😀🎉👩‍💻🇫🇷",
    "中文文本，日本語のテキスト，한국어 텍스트",
    "Café, naïve, résumé, Ångström, Straße, façade",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after an end token",
    "Numbers: 3.14159, 1,000,000, 2024-11-26, 0x1F",
    "Mixed\r\nline\rendings\n\n\n",
    "αβγ δεζ — “quotes” and ‘apostrophes’ …",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder, gguf_file=GGUF_FILE)


@pytest.mark.parametrize("text", VARIED_STRINGS)
def test_ids_match_transformers_gguf_tokenizer(smollm2, reference_tokenizer, text):
    ids = smollm2.tokenizer.encode(text)
    assert ids == reference_tokenizer(text)["input_ids"]
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_no_bos(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # <|im_start|> and <|im_end|>, each one token
    assert tok.encode("Hi")[0] != 1  # SmolLM2 adds no BOS
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_chat_template_renders_chatml(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", [s for s in VARIED_STRINGS if s])
def test_incremental_deltas_join_to_the_full_decode(smollm2, text):
    tok = smollm2.tokenizer
    ids = tok.encode(text)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = [detok.add(i) for i in ids]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)


def test_a_character_split_across_tokens_is_held_back(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("🐍")
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🐍"


def test_an_incomplete_character_at_the_end_is_never_emitted(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("ok 🐍")
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids[:-1]) == "ok"


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid tokenizer file"):
        Tokenizer.from_folder(tmp_path)


# Chat templates: the real templates of the supported families, rendered as transformers renders them.

CHAT_TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# template file -> the special tokens of a checkpoint that ships it, and whether its tokenizer adds BOS
TEMPLATE_TOKENS = {
    "smollm2.jinja": ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, False),
    "qwen2.jinja": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
    "mistral-7b-instruct-v0.1.jinja": ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, True),
    "mistral-nemo-instruct-2407.jinja": ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, True),
    "gemma-3-it.jinja": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, True),
    "llama-3-instruct.jinja": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, True),
    "llama-3.2-instruct.jinja": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, True),
}
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "What is the capital of France?"}],
    "single turn with system": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [
        {"role": "user", "content": "Hi there  "},
        {"role": "assistant", "content": " Hello! How can I help?"},
        {"role": "user", "content": "Name a colour, and say \"why\" <in> {braces} & tabs\t."},
    ],
    "multi-turn with system": [
        SYSTEM,
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times three? Ünïcödé 😀"},
    ],
}
# Mistral v0.1 supports no system message: its template raises, in transformers as here.
REJECTS_SYSTEM = {"mistral-7b-instruct-v0.1.jinja"}


def write_checkpoint_tokenizer(folder: Path, special: dict[str, str], adds_bos: bool) -> Path:
    """A small word-level tokenizer.json holding the special tokens (BOS added by its post-processor if asked)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    specials = list(dict.fromkeys(special.values()))
    vocab = {token: i for i, token in enumerate(["[UNK]", *specials])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    if adds_bos:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    backend.save(str(folder / "tokenizer.json"))
    return folder


def checkpoint_with_template(folder: Path, name: str, how: str = "jinja file") -> Path:
    """A tokenizer folder carrying the fixture template `name` in one of the layouts transformers reads."""
    special, adds_bos = TEMPLATE_TOKENS[name]
    write_checkpoint_tokenizer(folder, special, adds_bos)
    template = (CHAT_TEMPLATES / name).read_text(encoding="utf-8")
    settings: dict = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    if how == "jinja file":
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif how == "config string":
        settings["chat_template"] = template
    else:  # a list of named templates, as tokenizer_config.json keeps several
        settings["chat_template"] = [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": template},
        ]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def transformers_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATE_TOKENS)
def test_chat_template_renders_as_transformers(tmp_path, name, conversation):
    folder = checkpoint_with_template(tmp_path / "tok", name)
    ours, reference = Tokenizer.from_folder(folder), transformers_tokenizer(folder)
    messages = CONVERSATIONS[conversation]
    if name in REJECTS_SYSTEM and messages[0]["role"] == "system":
        with pytest.raises(Exception, match="roles must alternate") as reference_error:
            reference.apply_chat_template(messages, tokenize=False)
        with pytest.raises(InvalidParameterError) as our_error:
            ours.apply_chat_template(messages)
        assert str(reference_error.value) in str(our_error.value)
        return
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("how", ["jinja file", "config string", "named list"])
def test_chat_template_is_read_from_each_layout(tmp_path, how):
    folder = checkpoint_with_template(tmp_path / "tok", "gemma-3-it.jinja", how)
    messages = CONVERSATIONS["multi-turn with system"]
    expected = transformers_tokenizer(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_folder(folder).apply_chat_template(messages) == expected


def test_the_jinja_file_wins_over_the_config(tmp_path):
    folder = checkpoint_with_template(tmp_path / "tok", "qwen2.jinja", "config string")
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_a_template_raise_exception_is_a_clear_invalid_parameter_error(tmp_path):
    tok = Tokenizer.from_folder(checkpoint_with_template(tmp_path / "tok", "gemma-3-it.jinja"))
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidParameterError, match="roles must alternate user/assistant") as caught:
        tok.apply_chat_template(not_alternating)
    assert isinstance(caught.value, ValueError)


def test_strftime_now_gives_todays_date(tmp_path):
    tok = Tokenizer.from_folder(checkpoint_with_template(tmp_path / "tok", "llama-3.2-instruct.jinja"))
    before = datetime.now().strftime("%d %b %Y")
    prompt = tok.apply_chat_template(CONVERSATIONS["single turn"])
    assert f"Today Date: {before}" in prompt or f"Today Date: {datetime.now().strftime('%d %b %Y')}" in prompt


def test_a_chat_template_cannot_reach_python_internals(tmp_path):
    folder = checkpoint_with_template(tmp_path / "tok", "qwen2.jinja")
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unsafe"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_chat_template_with_a_syntax_error_names_the_checkpoint(tmp_path):
    folder = checkpoint_with_template(tmp_path / "tok", "qwen2.jinja")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_tokens_come_from_the_config(tmp_path):
    tok = Tokenizer.from_folder(checkpoint_with_template(tmp_path / "tok", "llama-3-instruct.jinja"))
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert tok.adds_bos_token


def test_smollm2_checkpoint_template_matches_transformers(smollm2, smollm2_folder):
    reference = transformers_tokenizer(smollm2_folder)
    for messages in CONVERSATIONS.values():
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm2.tokenizer.apply_chat_template(messages) == expected
    assert not smollm2.tokenizer.adds_bos_token
