"""`llm.run_batch` and `nanoengine batch`: formats, per-line errors, resuming, and kill -9 at random moments.

All on a tiny random Llama with SmolLM2's tokenizer and chat template: its greedy texts are
deterministic, and batched equal solo (tests/test_engine.py), so a resumed run must give the
texts of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import nanoengine
from conftest import save_tiny_llama, wait_until
from nanoengine import Completion
from nanoengine.batch.files import BatchFileError, ResultsFile
from nanoengine.errors import NanoEngineError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_folder) -> str:
    folder = save_tiny_llama(tmp_path_factory.mktemp("batch") / "tiny", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer and its chat template
        shutil.copy(smollm2_folder / name, folder)
    return str(folder)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(records: list[dict]) -> dict:
    return {r["custom_id"]: r for r in records}


def text_of(record: dict) -> str:
    body = record["response"]["body"]
    if "output" in body:  # a plain line: LLM Engine's response
        return body["output"]["text"]
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_each_format_answers_as_its_own_api(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    messages = [{"role": "user", "content": "Hi there"}]
    lines = [
        {"prompt": "Once upon a time", "max_new_tokens": 6},
        {"custom_id": "chat-plain", "messages": messages},
        {"custom_id": "seeded", "prompt": "Hello", "temperature": 1.0},
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"model": "any", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "n": 2}},
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "any", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True}},
    ]  # fmt: skip
    out = tmp_path / "out.jsonl"
    summary = llm.run_batch(write_lines(tmp_path / "in.jsonl", lines), out, max_new_tokens=4, temperature=0, seed=7)
    assert (summary.total, summary.succeeded, summary.failed) == (5, 5, 0)
    records = by_id(read_records(out))
    assert set(records) == {"line-1", "chat-plain", "seeded", "cmpl", "chat"}
    for record in records.values():
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200
    greedy = lambda prompt, n: Completion.create(tiny, prompt, n, 0, timeout=60).output.text  # noqa: E731
    assert text_of(records["line-1"]) == greedy("Once upon a time", 6)  # the line's own max_new_tokens
    assert text_of(records["chat-plain"]) == llm.chat(messages, max_new_tokens=4, temperature=0).text
    # line 3 of the input, with the batch's seed 7: seed 7 + 2
    assert text_of(records["seeded"]) == Completion.create(tiny, "Hello", 4, 1.0, seed=9, timeout=60).output.text
    cmpl = records["cmpl"]["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["model"] == "any"
    assert [c["text"] for c in cmpl["choices"]] == [greedy("Once upon a time", 5)] * 2
    chat = records["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"] == llm.chat(messages, max_new_tokens=5, temperature=0).text
    assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"]


def test_a_bad_line_gets_its_own_error_line_and_the_job_goes_on(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    lines = [
        "{not json",
        "[1, 2]",
        {"body": {"prompt": "no id"}},
        {"custom_id": "ok", "prompt": "Hello"},
        {"custom_id": "ok", "prompt": "again"},
        {"custom_id": "url", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "temp", "prompt": "Hello", "temperature": -1},
        {"custom_id": "unknown", "prompt": "Hello", "colour": "red"},
        {"custom_id": "both", "prompt": "Hello", "messages": [{"role": "user", "content": "Hi"}]},
        {"custom_id": "long", "prompt": "word " * 300},
        {"custom_id": "oa-field", "body": {"prompt": "Hello", "max_tokens": "lots"}},
        {"custom_id": "oa-stream", "body": {"prompt": "Hello", "stream": True}},
        {"custom_id": "oa-bias", "body": {"prompt": "Hello", "logit_bias": {"1": 5}}},
        {"custom_id": "last", "prompt": "Bye"},
    ]
    out = tmp_path / "out.jsonl"
    summary = llm.run_batch(write_lines(tmp_path / "in.jsonl", lines), out, max_new_tokens=3, temperature=0)
    records = read_records(out)
    assert len(records) == len(lines) and (summary.succeeded, summary.failed) == (2, len(lines) - 2)
    unrunnable = {r["line"]: r["error"]["code"] for r in records if r["error"] is not None}
    assert unrunnable == {1: "invalid_json", 2: "invalid_line", 3: "missing_custom_id", 5: "duplicate_custom_id", 6: "unsupported_url"}
    answered = {r["custom_id"]: r["response"] for r in records if r["error"] is None}
    assert {k for k, v in answered.items() if v["status_code"] == 200} == {"ok", "last"}
    assert text_of({"response": answered["ok"]}) == Completion.create(tiny, "Hello", 3, 0, timeout=60).output.text
    details = {k: v["body"].get("detail") for k, v in answered.items() if v["status_code"] == 400}
    assert "temperature" in details["temp"] and "colour" in details["unknown"] and "either" in details["both"]
    assert "exceeds" in details["long"]
    openai_errors = {k: v["body"]["error"] for k, v in answered.items() if k.startswith("oa-")}
    assert openai_errors["oa-field"]["param"] == "max_tokens" and openai_errors["oa-stream"]["param"] == "stream"
    assert openai_errors["oa-bias"]["param"] == "logit_bias"


def test_a_rerun_cuts_a_torn_line_off_and_answers_only_what_is_missing(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    source = write_lines(tmp_path / "in.jsonl", [{"custom_id": f"p{i}", "prompt": f"Story {i}:"} for i in range(6)])
    whole = tmp_path / "whole.jsonl"
    llm.run_batch(source, whole, max_new_tokens=5, temperature=0)
    kept = whole.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(kept[:2]) + kept[2][:25])  # two complete lines and a torn third
    summary = llm.run_batch(source, out, max_new_tokens=5, temperature=0)
    assert (summary.already_done, summary.succeeded) == (2, 4)
    records = read_records(out)  # every line is JSON again: the torn one is gone
    assert sorted(r["custom_id"] for r in records) == [f"p{i}" for i in range(6)]
    assert {k: text_of(r) for k, r in by_id(records).items()} == {k: text_of(r) for k, r in by_id(read_records(whole)).items()}
    assert llm.run_batch(source, out).succeeded == 0 and len(read_records(out)) == 6  # nothing left to do


def test_the_output_of_another_job_or_one_being_written_is_refused(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    source = write_lines(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "Hi"}])
    other = write_lines(tmp_path / "other.jsonl", [{"custom_id": "z", "response": None, "error": None}])
    with pytest.raises(NanoEngineError, match="another job's output"):
        llm.run_batch(source, other, max_new_tokens=2)
    notes = write_lines(tmp_path / "notes.jsonl", ["some notes"])
    with pytest.raises(BatchFileError, match="not a batch output line"):
        llm.run_batch(source, notes, max_new_tokens=2)
    with ResultsFile(tmp_path / "out.jsonl"):
        with pytest.raises(BatchFileError, match="another batch job"):
            llm.run_batch(source, tmp_path / "out.jsonl", max_new_tokens=2)
    assert notes.read_text() == "some notes\n" and read_records(other)[0]["custom_id"] == "z"


def test_score_mode_writes_each_texts_logprobs_and_perplexity(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    texts = ["The cat sat on the mat.", "Hello", "Colourless green ideas sleep furiously."]
    lines = [{"custom_id": f"t{i}", "text": t} for i, t in enumerate(texts)] + [{"custom_id": "empty", "text": ""}]
    out = tmp_path / "scores.jsonl"
    summary = llm.run_batch(write_lines(tmp_path / "in.jsonl", lines), out, score=True)
    assert (summary.succeeded, summary.failed) == (3, 1)
    records = by_id(read_records(out))
    for i, scored in enumerate(llm.score(texts)):
        body = records[f"t{i}"]["response"]["body"]
        assert body["tokens"] == scored.tokens and body["token_logprobs"] == pytest.approx(scored.token_logprobs)
        assert body["logprob"] == pytest.approx(scored.logprob)
        assert body["perplexity"] == (None if len(scored.tokens) == 1 else pytest.approx(scored.perplexity))
    assert records["empty"]["response"]["status_code"] == 400


def batch_command(tiny: str, source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nanoengine", "batch", str(source), str(out), "--model", tiny,
            "--max-new-tokens", "24", "--max-batch-size", "2", "--no-progress"]  # fmt: skip


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_output_exactly_once(tiny, tmp_path):
    llm = nanoengine.load(tiny)
    count = 120
    lines = [{"custom_id": f"q{i}", "prompt": f"Question {i}: what is {i} plus {i % 7}?"} for i in range(count)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    llm.run_batch(source, reference, max_new_tokens=24, temperature=0)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    rng = random.Random(19)
    targets = sorted(rng.sample(range(1, count * 2 // 3), 3))
    for target in [0] + targets:  # the first: killed at its first complete line
        process = subprocess.Popen(batch_command(tiny, source, out), env=env, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: complete_lines(out) > target or process.poll() is not None, 300)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(30)
        assert process.returncode == -signal.SIGKILL, "the job ended before it could be killed"
        raw = out.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        for line in complete.splitlines():  # every complete line is a valid answer
            assert json.loads(line)["response"]["status_code"] == 200
    done = subprocess.run(batch_command(tiny, source, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert sorted(r["custom_id"] for r in records) == sorted(line["custom_id"] for line in lines)  # each once
    expected = {k: text_of(r) for k, r in by_id(read_records(reference)).items()}
    assert {k: text_of(r) for k, r in by_id(records).items()} == expected


def test_the_command_names_a_missing_input_and_a_missing_ray_extra_in_one_line(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    missing = subprocess.run(batch_command(tiny, tmp_path / "nope.jsonl", tmp_path / "out.jsonl"),
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"nanoengine batch: error: INPUT {tmp_path / 'nope.jsonl'} is not a file"
    ]
    blocker = tmp_path / "no-ray" / "ray"  # a `ray` that cannot be imported, shadowing an installed one
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    no_ray = subprocess.run(batch_command(tiny, source, tmp_path / "out.jsonl") + ["--ray"], capture_output=True,
                            text=True, timeout=120, env={**env, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{SRC}"})  # fmt: skip
    assert no_ray.returncode == 1
    assert no_ray.stderr.strip().splitlines() == [
        "nanoengine: error: running on Ray needs the ray extra: pip install 'nanoengine[ray]'"
    ]
    assert not (tmp_path / "out.jsonl").exists()
