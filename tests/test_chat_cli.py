"""`nanoengine chat` and `complete --chat`, run as a user runs them: a subprocess fed through stdin.

Ctrl-C is a real SIGINT. Each step waits for what the process prints (with generous bounds), never
for a length of time: the answer that is interrupted is hundreds of tokens long, and the
interrupt is sent once its first words have been read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nanoengine
from nanoengine.cli.chat import QUIT_HINT


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanoengine", *args]


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(command("chat", *args), input=stdin, capture_output=True, text=True, timeout=600)


class Conversation:
    """A `nanoengine chat` process whose output is collected as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            command("chat", *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout, self.stderr = [], []
        for stream, sink in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _collect(stream, sink: list[str]) -> None:
        for piece in iter(lambda: stream.read(1), ""):
            sink.append(piece)

    def say(self, text: str) -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def wait_for(self, where: list[str], text: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while text not in "".join(where):
            assert self.process.poll() is None, f"the chat ended early: {''.join(self.stderr)}"
            assert time.monotonic() < deadline, f"{text!r} never came; stderr: {''.join(self.stderr)}"
            time.sleep(0.05)

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def end(self, seconds: float = 300) -> int:
        try:
            return self.process.wait(seconds)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def llm(smollm2_folder):
    return nanoengine.load(smollm2_folder)


def test_a_piped_conversation_keeps_its_history(llm):
    first, second = "Name a colour.", "Name a fruit of that colour."
    done = chat("--max-new-tokens", "12", stdin=f"{first}\n\n{second}\n")
    assert done.returncode == 0, done.stderr
    answer1 = llm.chat([{"role": "user", "content": first}], max_new_tokens=12, temperature=0).text
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer1},
        {"role": "user", "content": second},
    ]
    answer2 = llm.chat(history, max_new_tokens=12, temperature=0).text
    assert done.stdout == f"{answer1}\n{answer2}\n"
    assert done.stderr.count("prompt tokens") == 2  # one line per turn; the empty line was no turn


def test_a_system_message_opens_the_conversation(llm):
    system = "You are a pirate."
    done = chat("--system", system, "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "4", stdin="Hello!\n")
    assert done.returncode == 0, done.stderr
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    assert done.stdout == llm.chat(messages, max_new_tokens=8, temperature=0.7, seed=4).text + "\n"


def test_ctrl_c_ends_the_answer_and_the_conversation_goes_on():
    conversation = Conversation("--max-new-tokens", "2000")
    conversation.say("Repeat the word hello 1000 times.")
    conversation.wait_for(conversation.stdout, "hello, hello")
    conversation.interrupt()
    conversation.wait_for(conversation.stderr, "[stopped]")
    conversation.say("Say hi.")
    conversation.process.stdin.close()
    assert conversation.end() == 0, "".join(conversation.stderr)
    stderr = "".join(conversation.stderr)
    assert stderr.count("prompt tokens") == 1  # the second answer ran to its end
    assert "Traceback" not in stderr and QUIT_HINT not in stderr
    assert "".join(conversation.stdout).count("\n") >= 2  # the stopped answer and the next one


def test_ctrl_c_twice_at_the_prompt_ends_the_session():
    conversation = Conversation("--max-new-tokens", "3")
    conversation.say("Hi")
    conversation.wait_for(conversation.stderr, "prompt tokens")  # the answer is done: the prompt is next
    conversation.interrupt()
    conversation.wait_for(conversation.stderr, QUIT_HINT)
    conversation.interrupt()
    assert conversation.end() == 0
    assert "Traceback" not in "".join(conversation.stderr)


def test_end_of_input_ends_the_session_cleanly():
    done = chat(stdin="")
    assert done.returncode == 0 and done.stdout == "", done.stderr


def test_bad_options_are_refused_before_loading():
    done = chat("--temperature", "9", stdin="Hi\n")
    assert done.returncode == 2 and "temperature" in done.stderr
    assert "loaded" not in done.stderr  # no model was loaded for it


def test_a_checkpoint_without_a_chat_template_is_refused(tmp_path, smollm2_folder):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(Path(smollm2_folder) / name, folder / name)
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    done = chat("--model", str(folder), stdin="Hi\n")
    assert done.returncode == 2 and "no chat template" in done.stderr


def test_complete_chat_answers_as_llm_chat(llm):
    question = "What is the capital of France?"
    done = subprocess.run(
        command("complete", "--chat", question, "--max-new-tokens", "10"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == llm.chat([{"role": "user", "content": question}], max_new_tokens=10, temperature=0).text + "\n"
