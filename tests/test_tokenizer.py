"""The tokenizer built from the GGUF against transformers' own GGUF tokenizer, and incremental
detokenization."""

from __future__ import annotations

import pytest

from nanoengine import CheckpointError, IncrementalDetokenizer, Tokenizer

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
