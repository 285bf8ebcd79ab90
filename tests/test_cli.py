"""The `nanoengine` console script, run as a user runs it: a subprocess."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")  # importing llmengine asks PyPI otherwise

from nanoengine import DEFAULT_MODEL, Completion  # noqa: E402


def command(*args: str) -> list[str]:
    """The console script with `args`; `python -m nanoengine` where the script is not on PATH."""
    exe = shutil.which("nanoengine")
    return [exe, *args] if exe else [sys.executable, "-m", "nanoengine", *args]


def nanoengine(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), input=stdin, capture_output=True, text=True, timeout=300)


def test_complete_prints_a_sensible_answer(smollm2_folder):
    done = nanoengine("complete", "--chat", "What is the capital of France?", "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "new tokens" in done.stderr


def test_complete_reads_the_prompt_from_stdin_and_streams_what_the_library_returns(smollm2_folder):
    expected = Completion.create(DEFAULT_MODEL, "The capital of France is", 5, temperature=0, timeout=120).output
    done = nanoengine("complete", "--max-new-tokens", "5", stdin="The capital of France is")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert f"[{expected.num_prompt_tokens} prompt tokens, 5 new tokens" in done.stderr
    # The prompt's pass and the decoding are timed apart: one speed over both would mix them.
    assert re.search(r"prompt pass and first token [\d.]+ s \(\d+ tokens/s\), then decoding at [\d.]+ tokens/s", done.stderr)


def test_python_dash_m_works_too(smollm2_folder):
    done = subprocess.run([sys.executable, "-m", "nanoengine", "models"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "smollm2-135m-instruct\tpresent" in done.stdout


def test_fetch_of_a_present_model_is_a_no_op(smollm2_folder):
    done = nanoengine("fetch", "smollm2-135m-instruct")
    assert done.returncode == 0 and done.stdout.strip() == str(smollm2_folder)
    assert "already present" in done.stderr


def test_unknown_model_is_a_one_line_error():
    done = nanoengine("complete", "hi", "--model", "no-such-model")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("nanoengine: error: unknown model 'no-such-model'")
    assert "Traceback" not in done.stderr


# --- the Completion facade behind `complete`, usage errors, Ctrl-C, serve and bench ---

PROMPT = "The capital of France is"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_on_a_terminal
    )


def ctrl_c_as_on_a_terminal() -> None:
    """SIGINT's default action in the child, as from a terminal: a test run started in the
    background by a shell ignores SIGINT, its children inherit that, and Python then leaves it
    ignored, so `complete` would never see the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Lines:
    """The lines of a process's pipe, read in a thread so that waiting for one can time out."""

    def __init__(self, stream) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, seconds: float) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.seen.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                continue
            if found := re.search(pattern, self.seen[-1]):
                return found
        raise AssertionError(f"no line matched {pattern!r} in {seconds} s; got: {''.join(self.seen)}")


def test_no_stream_and_stop_sequences(smollm2_folder):
    expected = Completion.create(DEFAULT_MODEL, PROMPT, 6, temperature=0, timeout=120, stop_sequences=["."])
    done = nanoengine("complete", "--no-stream", "--stop", ".", "--stop", "!", "--max-new-tokens", "6", PROMPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.output.text + "\n" and "." not in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["complete", "hi", "--top-k", "0"], "nanoengine complete: error: --top-k"),
        (["complete", "hi", "--max-new-tokens", "many"], "invalid int value"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    done = nanoengine(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_stops_the_generation_cleanly(smollm2_folder):
    process = start("complete", "--max-new-tokens", "400", "1, 2, 3, 4, 5, 6, 7, 8,")  # counts on and on
    try:
        assert process.stdout.read(8), "no text came before the end"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr


def test_models_lists_sizes_and_folders(smollm2_folder):
    done = nanoengine("models")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split("\t")[:4] == ["NAME", "STATE", "SIZE", "FOLDER"]
    name, state, size, folder, _ = next(row.split("\t") for row in rows if row.startswith(DEFAULT_MODEL))
    assert state == "present" and size.endswith(" MiB") and Path(folder) == smollm2_folder


def test_bench_hands_its_arguments_to_the_benchmark_script():
    done = nanoengine("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


def test_serve_answers_the_llmengine_client_and_stops_on_ctrl_c(smollm2_folder, monkeypatch):
    import llmengine

    process = start("serve", "--port", "0")
    try:
        stderr = Lines(process.stderr)
        found = stderr.wait_for(r"running on (http://127\.0\.0\.1:\d+)", seconds=120)
        monkeypatch.setenv("LLM_ENGINE_BASE_PATH", found.group(1) + "/")
        response = llmengine.Completion.create(model=DEFAULT_MODEL, prompt=PROMPT, max_new_tokens=3, temperature=0)
        assert response.output.num_completion_tokens == 3
        logged = stderr.wait_for(r"(\S+) sync model=(\S+) tokens=(\d+) [\d.]+s 200", seconds=10)
        assert logged.groups() == (response.request_id, DEFAULT_MODEL, "3")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode in (0, 130)
    assert not any("Traceback" in line or "terminate called" in line for line in stderr.seen)


def test_serve_refuses_a_model_it_cannot_find():
    done = nanoengine("serve", "--models", "no-such-model")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("nanoengine: error: --models 'no-such-model'")


# --- every option checked before any model is loaded (issue 13, item 6; issue 11's new-user fixes) ---


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--port", "99999"], "argument --port: must be in 0..65535"),
        (["serve", "--request-timeout", "nan"], "argument --request-timeout: must be a finite number"),
        (["serve", "--request-timeout", "inf"], "argument --request-timeout: must be a finite number"),
        (["serve", "--receive-timeout", "0"], "argument --receive-timeout: must be a finite number"),
        (["serve", "--max-connections", "0"], "argument --max-connections: must be an integer >= 1"),
        (["serve", "--api-key", ""], "argument --api-key: must not be empty"),
        (["complete", "hi", "--device", "mps"], "argument --device: must be 'cpu', 'cuda' or 'auto', not 'mps'"),
        (["complete", "hi", "--dtype", "fp16"], "argument --dtype: must be one of float32"),
        (["serve", "--dtype", "fp16"], "argument --dtype: must be one of float32"),
        (["complete", "hi", "--temperature", "5"], "--temperature must be in"),
        (["complete", "hi", "--top-p", "0"], "--top-p must be a number in (0, 1]"),
        (["complete", "a\udc80b"], "prompt must be valid Unicode text"),
    ],
)
def test_bad_options_are_one_line_before_any_model_is_loaded(smollm2_folder, args, message):
    done = subprocess.run(command(*args), capture_output=True, text=True, timeout=300, errors="surrogateescape")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no "loading ..." line: nothing was loaded
    assert message in done.stderr and "configure()" not in done.stderr


def test_an_empty_api_key_in_the_environment_is_refused():
    env = {**os.environ, "NANOENGINE_API_KEY": ""}
    done = subprocess.run(command("serve"), capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == "nanoengine serve: error: $NANOENGINE_API_KEY is set but empty: unset it to serve without a key"


def test_chat_on_a_checkpoint_without_a_template_fails_before_loading(smollm2_folder, tmp_path):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).symlink_to(smollm2_folder / name)
    done = nanoengine("complete", "--chat", "hi", "--model", str(folder))
    assert done.returncode == 2
    assert done.stderr.strip() == f"nanoengine complete: error: --chat: {folder} has no chat template; leave --chat out to complete raw text"


def test_version():
    from importlib.metadata import version

    done = nanoengine("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"nanoengine {version('nanoengine')}"


def test_bench_help_is_the_bench_commands_own():
    done = nanoengine("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: nanoengine bench ")
    assert re.search(r"--runs RUNS\s+measured runs per system", done.stdout)


def test_make_run_installs_no_test_stack_and_make_test_does():
    root = Path(__file__).resolve().parents[1]
    plan = {
        target: subprocess.run(["make", "-n", "-B", target], cwd=root, capture_output=True, text=True, timeout=60).stdout
        for target in ("run", "test")
    }  # -n: print the commands, run none; -B: as on a fresh clone
    for target, extra in (("run", '-e ".[server]"'), ("test", '-e ".[test]"')):
        assert extra in plan[target], plan[target]
        assert plan[target].index("torch==") < plan[target].index(extra), "the CPU torch must come first"
    assert ".[test]" not in plan["run"]


def test_models_says_which_files_of_a_checkpoint_cannot_be_read(tiny_llama_folder, tmp_path):
    from test_fetch import run_bound_by_file_modes

    (tiny_llama_folder / "tokenizer.json").write_text("{}")  # enough to be listed as a checkpoint
    (tiny_llama_folder / "model.safetensors").chmod(0o000)
    code = "import sys; from nanoengine.cli.main import main; sys.exit(main(['models']))"
    done = run_bound_by_file_modes(code, env={"NANOENGINE_WEIGHTS_DIR": str(tiny_llama_folder.parent)})
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("tiny-llama\t"))
    assert row.split("\t")[1] == "present, unreadable: model.safetensors"
