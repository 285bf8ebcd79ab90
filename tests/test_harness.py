"""lm-evaluation-harness on nanoengine, both ways, against lm-eval's own `hf` backend on the same model.

A small multiple-choice task is defined here (a task YAML over a JSON file the tests write; no hub)
and run three ways: lm-eval's `hf` model (transformers, the reference), our native `nanoengine`
model, and lm-eval's `local-completions` talking to a real `nanoengine serve` subprocess through
the OpenAI routes (token-id prompts, `echo`, `logprobs`). All three must agree: the same accuracy,
and every choice's log-likelihood within 1e-3.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file; nothing may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402  (the test extra installs the eval extra)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_cli import Lines, command, ctrl_c_as_on_a_terminal  # noqa: E402

from nanoengine import DEFAULT_MODEL  # noqa: E402

TASK = "nanoengine_tiny_mc"
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Mars", "Mercury", "Jupiter"], 2),
    ("What color is the sky on a clear day?", ["green", "red", "yellow", "blue"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("Which animal is known as the king of the jungle?", ["the zebra", "the lion", "the mouse", "the owl"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice", "glass"], 2),
    ("How many days are in a week?", ["five", "nine", "twelve", "seven"], 3),
    ("Which gas do plants take in from the air?", ["carbon dioxide", "helium", "neon", "argon"], 0),
    ("What is the largest ocean on Earth?", ["the Arctic", "the Pacific", "the Indian", "the Southern"], 1),
]


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    folder = tmp_path_factory.mktemp("tasks")
    data = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "data.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "data.json"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    return TaskManager(include_path=str(folder), include_defaults=False)  # lm-eval's own tasks take long to index


def evaluate(model, task_manager: TaskManager) -> tuple[float, list[list[tuple[float, bool]]]]:
    """The task's accuracy, and per question each choice's (log-likelihood, is_greedy)."""
    results = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=task_manager, log_samples=True,
                                      bootstrap_iters=0)  # fmt: skip
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return results["results"][TASK]["acc,none"], [[tuple(r) for r in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def hf_model(smollm2_folder):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smollm2_folder), dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def native_model(smollm2_folder):
    from nanoengine.evaluation.harness import NanoEngineLM

    return NanoEngineLM(pretrained=str(smollm2_folder))


@pytest.fixture(scope="module")
def reference(hf_model, task_manager):
    return evaluate(hf_model, task_manager)


@pytest.fixture(scope="module")
def served(smollm2_folder):
    """A real `nanoengine serve` subprocess on a free port; yields its base URL."""
    process = subprocess.Popen(command("serve", "--port", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=ctrl_c_as_on_a_terminal)  # fmt: skip
    try:
        found = Lines(process.stderr).wait_for(r"running on (http://127\.0\.0\.1:\d+)", seconds=300)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def assert_agree(ours, reference) -> None:
    accuracy, choices = ours
    expected_accuracy, expected_choices = reference
    assert accuracy == expected_accuracy
    ours_flat = [lp for question in choices for lp, _ in question]
    expected_flat = [lp for question in expected_choices for lp, _ in question]
    assert len(ours_flat) == len(expected_flat) == 4 * len(QUESTIONS)
    assert ours_flat == pytest.approx(expected_flat, abs=1e-3)
    print(f"accuracy {accuracy}; largest log-likelihood difference from hf {max(abs(a - b) for a, b in zip(ours_flat, expected_flat)):.2e}")
    assert [g for q in choices for _, g in q] == [g for q in expected_choices for _, g in q]


def test_the_task_is_not_trivial(reference):
    accuracy, choices = reference
    assert 0.3 <= accuracy  # better than chance, so the choices' log-likelihoods decide something
    assert all(len({round(lp, 2) for lp, _ in question}) == 4 for question in choices)


def test_the_native_model_agrees_with_hf(native_model, task_manager, reference):
    assert_agree(evaluate(native_model, task_manager), reference)


@pytest.fixture(scope="module")
def http_model(served, smollm2_folder):
    """lm-eval's `local-completions` on the server, sending token ids, 8 prompts per request."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        model=DEFAULT_MODEL, base_url=f"{served}/v1/completions", tokenizer_backend="huggingface",
        tokenizer=str(smollm2_folder), tokenized_requests=True, batch_size=8, max_retries=1,
    )  # fmt: skip


def test_local_completions_against_nanoengine_serve_agrees_with_hf(http_model, task_manager, reference):
    assert_agree(evaluate(http_model, task_manager), reference)


ROLLING = [Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog. It was not amused.",), 0)]
CONTEXTS = ["The capital of France is", "Question: What do bees make?\nAnswer:", "1, 2, 3, 4,"]
GENERATING = [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 12, "do_sample": False}), i)
              for i, c in enumerate(CONTEXTS)]  # fmt: skip


def test_rolling_log_likelihood_and_generation_agree_with_hf(native_model, hf_model):
    assert native_model.loglikelihood_rolling(ROLLING) == pytest.approx(hf_model.loglikelihood_rolling(ROLLING), abs=1e-3)
    ours, expected = native_model.generate_until(GENERATING), hf_model.generate_until(GENERATING)
    assert ours == expected and all("." not in text for text in ours)


def test_rolling_log_likelihood_and_generation_over_http_are_the_native_ones(native_model, http_model):
    assert http_model.loglikelihood_rolling(ROLLING) == pytest.approx(native_model.loglikelihood_rolling(ROLLING), abs=1e-3)
    assert http_model.generate_until(GENERATING) == native_model.generate_until(GENERATING)


def test_lm_eval_is_imported_only_by_the_evaluation_harness():
    check = "import sys, nanoengine, nanoengine.cli.main, nanoengine.server.openai_schema; print('lm_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def readme_blocks(kind: str) -> list[str]:
    from test_readme_examples import README

    text = README.read_text(encoding="utf-8")
    start = text.index("## Evaluate with lm-eval\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(rf"^```{kind}\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


def test_the_readme_evaluates_its_task_natively_with_nanoengine_eval_and_over_http(served, smollm2_folder, tmp_path, monkeypatch, capsys):
    from lm_eval.__main__ import cli_evaluate

    from nanoengine.cli.main import main

    [data], [task], [python] = readme_blocks("json"), readme_blocks("yaml"), readme_blocks("python")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_qa.json").write_text(data, encoding="utf-8")
    (tmp_path / "tasks" / "tiny_qa.yaml").write_text(task, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "README.md lm-eval example", "exec"), {"__name__": "__main__"})
    accuracy = float(capsys.readouterr().out.strip())
    native, over_http = [shlex.split(block.replace("\\\n", " ")) for block in readme_blocks("sh")]
    assert native[:3] == ["HF_DATASETS_OFFLINE=1", "nanoengine", "eval"]
    assert main(native[2:]) == 0
    [written] = list((tmp_path / "results").rglob("results_*.json"))
    assert json.loads(written.read_text(encoding="utf-8"))["results"]["tiny_qa"]["acc,none"] == accuracy
    command_line = over_http[over_http.index("lm_eval") :]
    command_line = [a.replace("http://127.0.0.1:5005", served).replace("weights/smollm2-135m-instruct", str(smollm2_folder))
                    for a in command_line]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*command_line, "--output_path", "http-results"])
    cli_evaluate()
    [written] = list((tmp_path / "http-results").rglob("results_*.json"))
    assert json.loads(written.read_text(encoding="utf-8"))["results"]["tiny_qa"]["acc,none"] == accuracy
