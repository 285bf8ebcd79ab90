"""`nanoengine chat`: a multi-turn conversation in the terminal.

The history is kept and sent whole each turn (through `llm.chat`, the path every chat surface
shares); answers are streamed. Ctrl-C while an answer is coming ends that answer (what was shown
stays in the history); at the prompt, Ctrl-C twice or Ctrl-D (end of input) ends the session.

A Ctrl-C during an answer only sets a flag that the token loop checks, so it can never land in
the middle of the bookkeeping; a second one before the answer has stopped (a long prompt still
being read) breaks out of the wait at once and drops the turn.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

from ..api.chat import Message
from .options import add_model_options, add_sampling_options, check_sampling_options, configure_model_options
from ..errors import InvalidParameterError, NanoEngineError
from ..weights.registry import DEFAULT_MODEL

logger = logging.getLogger("nanoengine")

CHAT_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "timeout")
PROMPT = ">>> "
QUIT_HINT = "(Ctrl-C again or Ctrl-D to quit)"


def add_chat_command(commands: argparse._SubParsersAction) -> None:

    chat = commands.add_parser(
        "chat",
        help="chat with a model in the terminal, the answers streamed",
        description="A multi-turn chat with a model's chat template. Type a message and press Enter; "
        "Ctrl-C stops an answer, Ctrl-C twice or Ctrl-D at the prompt ends the session. "
        "Messages can also be piped in, one per line.",
    )
    option = chat.add_argument
    option("--model", default=DEFAULT_MODEL, help=f"registered name or checkpoint folder (default: {DEFAULT_MODEL})")
    option("--system", metavar="TEXT", help="a system message that opens the conversation")
    add_sampling_options(chat, CHAT_SAMPLING, max_new_tokens=512)
    add_model_options(chat)


def run_chat(args: argparse.Namespace) -> int:
    """Check the options and the model's chat template, then load the model and converse."""
    from ..api.llm import load
    from ..weights.registry import resolve_model
    from ..model.tokenizer import Tokenizer

    sampling = {name: getattr(args, name) for name in CHAT_SAMPLING}
    check_sampling_options(args.model, "-", sampling)
    configure_model_options(args)
    if Tokenizer.from_folder(resolve_model(args.model)).chat_template is None:  # before the weights are loaded
        raise InvalidParameterError(f"--model {args.model}: this checkpoint has no chat template (use `complete`)")
    history: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    return ChatSession(load(args.model), sampling, history).run(read_line)


def read_line() -> str:
    """One message: with line editing on a terminal; '' at the end of input."""
    if sys.stdin.isatty():
        try:
            return input(PROMPT) + "\n"
        except EOFError:
            sys.stdout.write("\n")
            return ""
    return sys.stdin.readline()


class ChatSession:
    def __init__(self, llm: Any, sampling: dict[str, Any], history: list[Message]) -> None:
        self.llm, self.sampling, self.history = llm, sampling, history
        self.generating = False
        self.stop = threading.Event()

    def on_interrupt(self, signum: int, frame: Any) -> None:
        """Ctrl-C: stop the answer being generated (at the next token); at the prompt, or pressed again
        before a stopping answer has stopped, interrupt (the turn is then dropped from the history)."""
        if self.generating and not self.stop.is_set():
            self.stop.set()
            return
        raise KeyboardInterrupt

    def run(self, read: Callable[[], str]) -> int:
        previous = signal.signal(signal.SIGINT, self.on_interrupt)
        armed = False  # Ctrl-C was pressed at the prompt: another one ends the session
        try:
            while True:
                try:
                    line = read()
                    if not line:
                        return 0
                    if line.strip():
                        self.turn(line.rstrip("\n"))
                        armed = False
                except (NanoEngineError, TimeoutError) as err:  # e.g. the history outgrew the context
                    print(f"nanoengine chat: error: {err}", file=sys.stderr)
                except KeyboardInterrupt:
                    if armed:
                        sys.stdout.write("\n")
                        return 0
                    armed = True
                    print(f"\n{QUIT_HINT}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)

    def turn(self, text: str) -> None:
        """One exchange: the answer streamed to stdout and added, with the question, to the history."""
        messages = self.history + [{"role": "user", "content": text}]
        answer, chunk = [], None
        start = time.perf_counter()
        self.stop.clear()
        self.generating = True
        try:
            with closing(self.llm.chat(messages, stream=True, **self.sampling)) as stream:
                for chunk in stream:
                    if self.stop.is_set():  # Ctrl-C: nothing more is shown, and the history keeps what was
                        break
                    answer.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            self.history[:] = messages + [{"role": "assistant", "content": "".join(answer)}]
        finally:
            self.generating = False
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.stop.is_set():
            print("[stopped]", file=sys.stderr)
        elif chunk is not None:
            tokens = chunk.num_completion_tokens or 0
            logger.info("[%s prompt tokens, %s new tokens, %.1f s]", chunk.num_prompt_tokens, tokens, time.perf_counter() - start)
