"""Chat: messages through the checkpoint's template, then the completion; one path for every surface."""

from __future__ import annotations

import pytest
from test_tokenizer import CONVERSATIONS, checkpoint_with_template, transformers_tokenizer

import nanoengine
from nanoengine import CheckpointError, InvalidParameterError, Tokenizer
from nanoengine.api.chat import chat_prompt, validate_messages

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_folder):
    return nanoengine.load(smollm2_folder)


def test_chat_completes_the_rendered_template(llm):
    prompt = transformers_tokenizer(llm.folder).apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    expected = llm.complete(prompt, max_new_tokens=12, temperature=0)
    answer = llm.chat(QUESTION, max_new_tokens=12, temperature=0)
    assert answer == expected
    assert "Paris" in answer.text


def test_streamed_chat_joins_to_the_full_answer(llm):
    conversation = CONVERSATIONS["multi-turn with system"]
    full = llm.chat(conversation, max_new_tokens=16, temperature=0.7, seed=3)
    chunks = list(llm.chat(conversation, stream=True, max_new_tokens=16, temperature=0.7, seed=3))
    assert "".join(c.text for c in chunks) == full.text
    assert [c.finished for c in chunks][-1] and chunks[-1].num_completion_tokens == full.num_completion_tokens


def test_chat_takes_the_sampling_parameters_and_their_errors(llm):
    answer = llm.chat(QUESTION, max_new_tokens=30, temperature=0, stop_sequences=["Paris"], return_token_log_probs=True)
    assert "Paris" not in answer.text and len(answer.tokens) == answer.num_completion_tokens
    with pytest.raises(InvalidParameterError, match="temperature"):
        llm.chat(QUESTION, temperature=-1)


def test_chat_prompt_tokens_are_transformers_tokens(smollm2):
    reference = transformers_tokenizer(smollm2.folder)
    for messages in CONVERSATIONS.values():
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert smollm2.tokenizer.encode(chat_prompt(smollm2.tokenizer, messages)) == list(expected)


@pytest.mark.parametrize("name", ["gemma-3-it.jinja", "llama-3-instruct.jinja", "mistral-nemo-instruct-2407.jinja"])
def test_a_template_that_writes_bos_gets_one_bos(tmp_path, name):
    folder = checkpoint_with_template(tmp_path / "tok", name)
    ours, reference = Tokenizer.from_folder(folder), transformers_tokenizer(folder)
    messages = CONVERSATIONS["multi-turn"]
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = ours.encode(chat_prompt(ours, messages))
    assert ids == list(expected)
    assert ids.count(ours.token_to_id(ours.special_tokens["bos_token"])) == 1


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ("Hello", "messages must be a non-empty list"),
        ([], "messages must be a non-empty list"),
        (None, "messages must be a non-empty list"),
        (["Hello"], r"messages\[0\] must be a dict"),
        ([{"content": "Hello"}], r"messages\[0\]\['role'\] must be a non-empty string"),
        ([{"role": "", "content": "Hello"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], r"messages\[1\]\['content'\]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
    ],
)
def test_bad_messages_are_refused_before_any_work(llm, messages, complaint):
    with pytest.raises(InvalidParameterError, match=complaint):
        llm.chat(messages)


def test_text_parts_are_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}]
    assert validate_messages(messages) == [{"role": "user", "content": "a\nb"}]


def test_a_template_rejection_is_an_invalid_parameter(tmp_path):
    tok = Tokenizer.from_folder(checkpoint_with_template(tmp_path / "tok", "gemma-3-it.jinja"))
    with pytest.raises(InvalidParameterError, match="roles must alternate"):
        chat_prompt(tok, [{"role": "assistant", "content": "I speak first"}])


def test_a_checkpoint_without_a_template_says_so(tmp_path):
    folder = checkpoint_with_template(tmp_path / "tok", "qwen2.jinja", "config string")
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="no chat template"):
        chat_prompt(Tokenizer.from_folder(folder), QUESTION)


def test_the_readme_chat_example_runs(capsys, smollm2_folder):
    from test_readme_examples import README, python_blocks

    example = python_blocks(README.read_text(encoding="utf-8"), "## Chat")[0]
    assert "llm.chat(messages" in example
    exec(compile(example, "README.md chat example", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.count("Paris") == 2  # the full answer, then the streamed one
