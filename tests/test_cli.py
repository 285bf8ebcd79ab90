"""The `nanoengine` console script, run as a user runs it: a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys


def nanoengine(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("nanoengine") or sys.executable
    prefix = [exe] if exe != sys.executable else [sys.executable, "-m", "nanoengine"]
    return subprocess.run([*prefix, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_complete_prints_a_sensible_answer(smollm2_folder):
    done = nanoengine("complete", "--chat", "What is the capital of France?", "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "new tokens" in done.stderr


def test_complete_reads_the_prompt_from_stdin(smollm2_folder):
    done = nanoengine("complete", "--max-new-tokens", "5", stdin="The capital of France is")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


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
