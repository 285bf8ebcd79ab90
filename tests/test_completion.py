"""`Completion.create` / `acreate`, clause by clause of the contract (../shared/API.md).

End-to-end behaviour runs on the real SmolLM2 (few tokens: it decodes ~10 tokens/s on these
CPUs); the mechanics (timeouts, abandonment, concurrency, bad inputs) run on a tiny random
Llama that shares SmolLM2's tokenizer, with forward passes counted and, where a test needs
time to act, slowed by a hook.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager

import pytest
import torch

from nanoengine import (
    Completion,
    CompletionStreamV1Response,
    CompletionSyncV1Response,
    InvalidParameterError,
    RequestTimeoutError,
    SamplingParams,
    UnknownModelError,
    generate,
)
from nanoengine.api.models import get_model
from conftest import wait_until  # noqa: E402

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
EMOJI = "<|im_start|>user\nReply with three emoji.<|im_end|>\n<|im_start|>assistant\n"
LONG = 200  # max_new_tokens for requests that a test ends early
SLOW = 120  # timeout for the real model, on busy CPUs (the default 10 s is a few dozen tokens)


@pytest.fixture(scope="module")
def real(smollm2) -> str:
    return str(smollm2.folder)


@pytest.fixture(scope="module")
def greedy(smollm2) -> list[int]:
    """The runtime's own greedy continuation of CHAT (it ends with the EOS token)."""
    prompt_ids = smollm2.tokenizer.encode(CHAT)
    return [t.id for t in generate(smollm2.model, prompt_ids, 12)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_folder) -> str:
    """A random tiny Llama (context 256) with SmolLM2's tokenizer: a fast checkpoint folder."""
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("facade") / "tiny", vocab_size=49152)
    shutil.copy(smollm2_folder / "tokenizer.json", folder)
    return str(folder)


@contextmanager
def watch(folder: str, delay: float = 0.0):
    """Record the model's forward passes (thread id each), slowing each by `delay` seconds."""
    calls: list[int] = []

    def hook(module, args, output):
        calls.append(threading.get_ident())
        time.sleep(delay)

    handle = get_model(folder).model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def assert_stopped(folder: str, calls: list[int], at: int) -> None:
    """Once the engine has dropped the request, no forward pass ran beyond the one that may have
    been under way when the stream was left (`at` passes had run by then)."""
    engine = get_model(folder).engine
    assert wait_until(lambda: engine.active_requests == 0), "the engine still holds the request"
    assert len(calls) <= at + 1



def assert_model_free(folder: str) -> None:
    """The engine holds no request any more, and serves the next one."""
    engine = get_model(folder).engine
    assert wait_until(lambda: engine.active_requests == 0), "the engine still holds a request"
    assert Completion.create(folder, "Still there?", max_new_tokens=2).output.num_completion_tokens == 2


def assert_no_worker_threads() -> None:
    """Requests run on the engine's one loop: no thread per request is ever started."""
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("nanoengine") and n != "nanoengine-engine"], names


def joined(responses: list[CompletionStreamV1Response]) -> str:
    """Check the chunk invariants of the contract; return the deltas joined."""
    assert len({r.request_id for r in responses}) == 1
    outputs = [r.output for r in responses]
    assert all(r.error is None for r in responses)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    counts = [o.num_completion_tokens for o in outputs]
    # Cumulative; a reader that lags gets text-only chunks merged, so a count may skip ahead.
    assert counts == [0] or (counts[0] >= 1 and all(a < b for a, b in zip(counts, counts[1:])))
    assert all(o.num_prompt_tokens is None for o in outputs[:-1]) and outputs[-1].num_prompt_tokens > 0
    return "".join(o.text for o in outputs)


async def astream(**kwargs) -> list[CompletionStreamV1Response]:
    stream = await Completion.acreate(stream=True, **kwargs)
    return [chunk async for chunk in stream]


# --- Calls ---------------------------------------------------------------------------------


def test_signature_and_defaults_are_the_contracts():
    expected = [
        ("model_name", None), ("prompt", None), ("max_new_tokens", 20), ("temperature", 0.2),
        ("timeout", 10), ("stream", False), ("stop_sequences", None), ("return_token_log_probs", False),
        ("presence_penalty", None), ("frequency_penalty", None), ("top_k", None), ("top_p", None),
        ("include_stop_str_in_output", None), ("skip_special_tokens", True), ("seed", None), ("model", None),
    ]  # fmt: skip
    for method in (Completion.create, Completion.acreate):
        params = inspect.signature(method).parameters
        assert [(name, p.default) for name, p in params.items()] == expected
        keyword_only = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY]
        assert keyword_only == [name for name, _ in expected[6:]]


def test_positional_arguments_and_the_model_alias(tiny):
    positional = Completion.create(tiny, "Hello", 4, 0.0)
    alias = Completion.create(model=tiny, prompt="Hello", max_new_tokens=4, temperature=0.0)
    assert positional.output.text == alias.output.text and positional.output.num_completion_tokens == 4


def test_what_each_call_returns(tiny):
    assert isinstance(Completion.create(tiny, "Hi", 2), CompletionSyncV1Response)
    stream = Completion.create(tiny, "Hi", 2, stream=True)
    assert isinstance(stream, Iterator) and all(isinstance(c, CompletionStreamV1Response) for c in stream)

    async def main():
        assert isinstance(await Completion.acreate(tiny, "Hi", 2), CompletionSyncV1Response)
        stream = await Completion.acreate(tiny, "Hi", 2, stream=True)
        assert isinstance(stream, AsyncIterable)
        assert all([isinstance(c, CompletionStreamV1Response) async for c in stream])

    asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_acreate_never_blocks_the_event_loop(real, stream):
    """A ticking coroutine keeps running while the real model generates in a worker thread."""

    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        start = time.monotonic()
        if stream:
            await astream(model=real, prompt=CHAT, max_new_tokens=4, temperature=0, timeout=SLOW)
        else:
            await Completion.acreate(real, CHAT, max_new_tokens=4, temperature=0, timeout=SLOW)
        took = time.monotonic() - start
        task.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        return took, max(gaps), len(ticks)

    took, longest_gap, n = asyncio.run(main())
    assert took > 0.2 and n > 10
    assert longest_gap < took / 3  # a blocked loop would show one gap as long as the whole call


# --- Semantics: request ids, chunks, joining --------------------------------------------------


def test_request_id_is_a_fresh_uuid4_shared_by_all_chunks_of_a_stream(tiny):
    ids = [Completion.create(tiny, "Hi", 2).request_id for _ in range(2)]
    stream_ids = {c.request_id for c in Completion.create(tiny, "Hi", 3, stream=True)}
    async_ids = {c.request_id for c in asyncio.run(astream(model=tiny, prompt="Hi", max_new_tokens=3))}
    assert len(stream_ids) == len(async_ids) == 1
    all_ids = ids + list(stream_ids) + list(async_ids)
    assert len(set(all_ids)) == 4 and all(uuid.UUID(i).version == 4 for i in all_ids)


def test_temperature_zero_is_the_runtimes_greedy_continuation_with_its_log_probs(real, smollm2, greedy):
    out = Completion.create(real, CHAT, 12, 0, SLOW, return_token_log_probs=True).output
    assert out.text == smollm2.tokenizer.decode(greedy) == "The capital of France is Paris."
    assert greedy[-1] == 2 and out.num_completion_tokens == len(greedy) < 12  # it ended at EOS
    assert out.num_prompt_tokens == len(smollm2.tokenizer.encode(CHAT))
    # Each token's log-prob is log_softmax of the model's own logits, recomputed without a cache.
    ids = smollm2.tokenizer.encode(CHAT) + greedy
    with torch.inference_mode():
        logprobs = torch.log_softmax(smollm2.model(torch.tensor([ids]))[0].float(), dim=-1)
    n = out.num_prompt_tokens
    expected = [logprobs[n - 1 + i, token].item() for i, token in enumerate(greedy)]
    assert [t.token for t in out.tokens] == [smollm2.tokenizer.decode([i], skip_special_tokens=False) for i in greedy]
    assert [t.log_prob for t in out.tokens] == pytest.approx(expected, abs=1e-4)


def test_the_stream_joins_to_the_full_text_greedy(real, smollm2, greedy):
    expected = smollm2.tokenizer.decode(greedy)
    responses = list(Completion.create(real, CHAT, 12, 0, SLOW, stream=True, return_token_log_probs=True))
    assert joined(responses) == expected and len(responses) == len(greedy)
    assert responses[-1].output.token.token == "<|im_end|>"
    chunks = asyncio.run(astream(model=real, prompt=CHAT, max_new_tokens=12, temperature=0, timeout=SLOW))
    assert joined(chunks) == expected
    assert asyncio.run(Completion.acreate(real, CHAT, 12, 0, SLOW)).output.text == expected


def test_the_stream_joins_to_the_full_text_sampled_with_a_seed(real):
    options = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=1234, timeout=SLOW)
    full = Completion.create(real, CHAT, **options).output
    assert joined(list(Completion.create(real, CHAT, stream=True, **options))) == full.text
    assert full.num_completion_tokens >= 1


def test_zero_new_tokens_is_one_empty_finished_chunk(tiny):
    out = Completion.create(tiny, "Hello there", max_new_tokens=0).output
    assert (out.text, out.num_completion_tokens, out.num_prompt_tokens) == ("", 0, 2)
    (chunk,) = list(Completion.create(tiny, "Hello there", max_new_tokens=0, stream=True))
    assert joined([chunk]) == "" and chunk.output.num_prompt_tokens == 2


# --- Semantics: tokenization and text --------------------------------------------------------


def test_the_prompt_is_tokenized_as_tokenizer_json_says(real, smollm2):
    ids = smollm2.tokenizer.encode(CHAT)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # <|im_start|> x2, <|im_end|>: one token each
    out = Completion.create(real, CHAT, max_new_tokens=0).output
    assert out.num_prompt_tokens == len(ids)
    # SmolLM2's tokenizer.json adds no BOS token: a one-word prompt is one token.
    assert Completion.create(real, "Hello", max_new_tokens=0).output.num_prompt_tokens == 1


def test_a_character_split_across_tokens_is_held_back_then_dropped_if_incomplete(real, smollm2):
    """SmolLM2 answers with 🌟, whose four bytes are three tokens; the fourth token starts another."""
    for n, expected_chunks in [(3, ["", "", "🌟"]), (4, ["", "", "🌟", ""])]:
        responses = list(Completion.create(real, EMOJI, n, 0, SLOW, True, return_token_log_probs=True))
        assert [r.output.text for r in responses] == expected_chunks
        assert "\ufffd" in responses[0].output.token.token  # the token alone is half a character
        assert Completion.create(real, EMOJI, n, 0, SLOW).output.text == joined(responses) == "🌟"


def test_bytes_that_never_form_a_character_become_replacement_chars(tiny, monkeypatch):
    """With generation replaced by a fixed token list: tokens 230 and 249 are the bytes 0x8c and
    0x9f (continuation bytes, invalid on their own); 459 is " " plus the first two bytes of a
    three-byte character (b" \xe2\x80"), left incomplete: the space stays, the rest is dropped."""
    from nanoengine.engine import loop as engine

    tokenizer = get_model(tiny).tokenizer
    fixed = [230, 6004, 249, 6004, 459]  # b"\x8c", b"hi", b"\x9f", b"hi", b" \xe2\x80"

    def fake_sample(samplers, logits):
        """Each row's next token from `fixed`, by how many tokens its sampler has given."""
        picks = []
        for s in samplers:
            s.given = getattr(s, "given", 0) + 1
            picks.append(fixed[s.given - 1])
        return torch.tensor(picks), torch.full((len(picks),), -1.0)

    monkeypatch.setattr(engine, "sample", fake_sample)
    expected = tokenizer.decode(fixed[:4]) + " "
    assert expected == "\ufffdhi\ufffdhi "
    assert Completion.create(tiny, "x", max_new_tokens=5).output.text == expected
    assert joined(list(Completion.create(tiny, "x", max_new_tokens=5, stream=True))) == expected


def test_skip_special_tokens_and_the_eos_text(real, greedy):
    """The EOS token ends generation and its text is left out unless include_stop_str_in_output
    (vLLM's rule); skip_special_tokens=False then shows it."""
    kept = Completion.create(
        real, CHAT, 12, 0, include_stop_str_in_output=True, skip_special_tokens=False, timeout=SLOW
    ).output
    assert kept.text == "The capital of France is Paris.<|im_end|>"
    assert kept.num_completion_tokens == len(greedy)


# --- Semantics: sampling, seeds --------------------------------------------------------------


def test_sampling_options_are_the_runtimes(tiny):
    """Temperature, top_k, top_p, penalties and seed reach the sampler as SamplingParams, and
    each token's log-prob is log_softmax of the raw logits whatever the temperature."""
    loaded = get_model(tiny)
    options = dict(temperature=0.8, top_k=40, top_p=0.9, presence_penalty=0.5, frequency_penalty=1.0, seed=7)
    out = Completion.create(tiny, "Hello", max_new_tokens=12, return_token_log_probs=True, **options).output
    prompt_ids = loaded.tokenizer.encode("Hello")
    reference = list(generate(loaded.model, prompt_ids, 12, SamplingParams(**options)))
    ids = [t.id for t in reference]
    assert out.text == loaded.tokenizer.decode(ids)
    with torch.inference_mode():
        logprobs = torch.log_softmax(loaded.model(torch.tensor([prompt_ids + ids]))[0], dim=-1)
    expected = [logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(ids)]
    assert [t.log_prob for t in out.tokens] == pytest.approx(expected, abs=1e-4)


def test_a_tiny_temperature_or_top_p_is_greedy_not_an_error(tiny):
    """Logits / 1e-40 overflow float32, and top_p=1e-46 rounds to 0 there: both once ended in
    "probability tensor contains inf, nan or element < 0"."""
    greedy = Completion.create(tiny, "Hello", 6, 0).output.text
    assert Completion.create(tiny, "Hello", 6, 1e-40, seed=1).output.text == greedy
    assert Completion.create(tiny, "Hello", 6, 1.0, top_p=1e-46, seed=1).output.text == greedy


def test_penalties_discourage_repeating(real):
    """SmolLM2 answers EMOJI with 🌟🌟...; a presence penalty pushes it off the repeated tokens."""
    plain = Completion.create(real, EMOJI, 6, 0, SLOW).output.text
    penalized = Completion.create(real, EMOJI, 6, 0, SLOW, presence_penalty=2.0).output.text
    assert plain == "🌟🌟" and penalized != plain


def test_same_seed_same_text_different_seeds_different_text(tiny):
    def sample(seed, stream=False):
        result = Completion.create(tiny, "Once upon a time", 10, 1.0, stream=stream, seed=seed)
        return joined(list(result)) if stream else result.output.text

    texts = [sample(seed) for seed in range(4)]
    assert len(set(texts)) == 4
    assert sample(0) == texts[0] and sample(0, stream=True) == texts[0]
    assert asyncio.run(Completion.acreate(tiny, "Once upon a time", 10, 1.0, seed=0)).output.text == texts[0]


# --- Semantics: stop sequences ---------------------------------------------------------------


@pytest.mark.parametrize(
    "stops, include, expected, tokens",
    [
        ([" of Fra"], None, "The capital", 4),  # spans the tokens " of" and " France"
        ([" of Fra"], True, "The capital of Fra", 4),
        (["Paris", "capital"], None, "The ", 2),  # the earliest occurrence, not the first listed
        (["zebra"], None, "The capital of France is Paris.", 8),  # never appears
    ],
    ids=["multi-token", "included", "earliest", "never"],
)
def test_stop_sequences_in_both_modes(real, stops, include, expected, tokens):
    options = dict(max_new_tokens=12, temperature=0, timeout=SLOW)
    options.update(stop_sequences=stops, include_stop_str_in_output=include)
    out = Completion.create(real, CHAT, **options).output
    assert (out.text, out.num_completion_tokens) == (expected, tokens)
    responses = list(Completion.create(real, CHAT, stream=True, return_token_log_probs=True, **options))
    assert joined(responses) == expected and len(responses) == tokens  # one chunk per token with log-probs


def test_a_stream_holds_back_text_that_may_become_a_stop_string(real):
    """"Paris!" never appears, but "Paris" might have begun it: it waits for the next token."""
    # With log-probs every chunk is one token (none are merged), so the hold-back is visible.
    responses = list(Completion.create(real, CHAT, 12, 0, SLOW, True, stop_sequences=["Paris!"], return_token_log_probs=True))
    assert [r.output.text for r in responses][-3:] == [" ", "Paris.", ""]
    assert joined(responses) == "The capital of France is Paris."
    chunks = asyncio.run(
        astream(
            model=real, prompt=CHAT, max_new_tokens=12, temperature=0, stop_sequences=[" of Fra"], timeout=SLOW,
            return_token_log_probs=True,
        )
    )
    assert joined(chunks) == "The capital" and [c.output.text for c in chunks] == ["The", " capital", "", ""]


# --- Semantics: timeout ----------------------------------------------------------------------


def test_timeout_while_generating_full(tiny):
    with watch(tiny, delay=0.05) as calls:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="timeout of 0.5 s"):
            Completion.create(tiny, "Hello", LONG, timeout=0.5)
        took = time.monotonic() - start
        assert 0.5 <= took < 5.0  # long before the 200 slowed steps (10 s) would have ended
        assert_stopped(tiny, calls, at=len(calls))
    assert issubclass(RequestTimeoutError, TimeoutError)


def test_timeout_while_streaming_raises_after_the_chunks_delivered(tiny):
    with watch(tiny, delay=0.05) as calls:
        got = []
        with pytest.raises(RequestTimeoutError):
            for chunk in Completion.create(tiny, "Hello", LONG, timeout=0.5, stream=True):
                got.append(chunk)
        assert len(got) >= 3 and not any(c.output.finished for c in got)
        assert_stopped(tiny, calls, at=len(calls))

        async def main():
            got = []
            with pytest.raises(RequestTimeoutError):
                async for chunk in await Completion.acreate(tiny, "Hello", LONG, timeout=0.5, stream=True):
                    got.append(chunk)
            return got

        got = asyncio.run(main())
        assert len(got) >= 3 and not any(c.output.finished for c in got)
        assert_stopped(tiny, calls, at=len(calls))
    assert_no_worker_threads()


def test_timeout_counts_the_wait_for_a_free_slot(tiny, tmp_path):
    """With every row of the pool taken, a request waits in line, and the wait counts."""
    from nanoengine import configure
    from nanoengine.api import models

    folder = str(shutil.copytree(tiny, tmp_path / "one-row"))
    saved = models._settings
    configure(max_batch_size=1)
    try:
        # Slowed steps (200 take 10 s): unslowed, the tiny model's LONG tokens take about as long
        # as the two waits below (0.6-0.8 s), and the row could come free before the second.
        with watch(folder, delay=0.05):
            busy = Completion.create(folder, "Hello", LONG, timeout=60, stream=True)
            next(busy)  # the only row is taken
            for call in [
                lambda: Completion.create(folder, "Hello", 4, timeout=0.3),
                lambda: asyncio.run(Completion.acreate(folder, "Hello", 4, timeout=0.3)),
            ]:
                start = time.monotonic()
                with pytest.raises(RequestTimeoutError, match="0 of 4 tokens"):
                    call()
                assert 0.3 <= time.monotonic() - start
            busy.close()
        assert_model_free(folder)
    finally:
        models._settings = saved


def test_loading_the_model_once_is_not_counted(tiny, tmp_path, monkeypatch):
    """The clock starts once the model is loaded: a first request does not fail for the load."""
    from nanoengine.api import models as engine

    real_load = engine.load_model

    def slow_load(*args, **kwargs):
        time.sleep(0.6)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine, "load_model", slow_load)
    for name, call in [
        ("sync", lambda folder: Completion.create(folder, "Hello", 2, timeout=0.5)),
        ("async", lambda folder: asyncio.run(Completion.acreate(folder, "Hello", 2, timeout=0.5))),
    ]:
        folder = shutil.copytree(tiny, tmp_path / name)  # a folder not loaded yet
        assert call(str(folder)).output.num_completion_tokens == 2


# --- Semantics: abandonment ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["break", "close", "garbage-collected"])
def test_an_abandoned_stream_stops_generating_and_frees_the_model(tiny, how):
    with watch(tiny, delay=0.02) as calls:
        stream = Completion.create(tiny, "Hello", LONG, timeout=60, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        # prefill and two decode steps at least: the loop never waits for its reader, so it may
        # have run further before the break reached it
        assert len(calls) >= 3
        if how == "close":
            stream.close()
        elif how == "garbage-collected":
            gone = weakref.ref(stream)
            del stream
            gc.collect()
            assert gone() is None
        assert_stopped(tiny, calls, at=len(calls))
        assert_model_free(tiny)


@pytest.mark.parametrize("how", ["break", "aclose", "dropped-unread", "task-cancelled", "full-cancelled"])
def test_an_abandoned_async_request_stops_generating_and_frees_the_model(tiny, how):
    async def main(calls):
        if how == "full-cancelled":
            task = asyncio.create_task(Completion.acreate(tiny, "Hello", LONG, timeout=60))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return len(calls)
        stream = await Completion.acreate(tiny, "Hello", LONG, timeout=60, stream=True)
        if how == "dropped-unread":
            del stream
            gc.collect()
            return 1  # at most the first step ran
        got = []

        async def read():
            async for chunk in stream:
                got.append(chunk)
                if how != "task-cancelled" and len(got) == 3:
                    break

        task = asyncio.create_task(read())
        while not task.done() and len(got) < 3:
            await asyncio.sleep(0.01)
        if how == "task-cancelled":
            task.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "task-cancelled" else _nothing():
            await task
        if how == "aclose":
            await stream.aclose()
        at = len(calls)
        await asyncio.sleep(0.3)  # the event loop lives on: nothing forces the worker to stop
        return at

    with watch(tiny, delay=0.02) as calls:
        at = asyncio.run(main(calls))
        assert_stopped(tiny, calls, at=at)
        if how != "break":  # a kept stream keeps its (idle) worker until dropped or timed out
            assert_no_worker_threads()
        assert_model_free(tiny)


@contextmanager
def _nothing():
    yield


# --- Semantics: concurrency ------------------------------------------------------------------


def test_concurrent_threads_and_tasks_each_get_exactly_their_own_tokens(tiny):
    """8 acreate streams and 4 threads calling create at once, each equal to its solo run, batched."""
    requests = [dict(prompt=f"Request number {i}:", max_new_tokens=12, temperature=1.0, seed=i) for i in range(12)]
    solo = [Completion.create(tiny, **r).output.text for r in requests]
    assert len(set(solo)) == 12
    results: dict[int, str] = {}

    def in_thread(i):
        results[i] = Completion.create(tiny, timeout=120, **requests[i]).output.text

    async def in_task(i):
        stream = await Completion.acreate(tiny, timeout=120, stream=True, **requests[i])
        results[i] = "".join([chunk.output.text async for chunk in stream])

    async def tasks():
        await asyncio.gather(*(in_task(i) for i in range(4, 12)))

    with watch(tiny, delay=0.002) as calls:
        threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
    assert [results[i] for i in range(12)] == solo
    # All ran on the engine's one thread, and shared forward passes: 12 requests of 12 tokens
    # would take 144 passes one after the other.
    assert len(set(calls)) == 1 and len(calls) < 144 / 2


# --- Semantics: bad inputs -------------------------------------------------------------------

TINY = object()  # stands for the tiny model's folder in the table below
BAD_INPUTS = [
    (dict(prompt=""), InvalidParameterError, "prompt must be a non-empty string"),
    (dict(prompt=None), InvalidParameterError, "prompt must be a non-empty string"),
    (dict(prompt=["Hello"]), InvalidParameterError, "prompt must be a non-empty string"),
    (dict(max_new_tokens=-1), InvalidParameterError, r"max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.5), InvalidParameterError, r"max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=True), InvalidParameterError, r"max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=256), InvalidParameterError, r"max_new_tokens \(256\) exceeds the model's context of 256"),
    (dict(temperature=math.nan), InvalidParameterError, r"temperature must be a number in \[0, 2\]"),
    (dict(temperature=math.inf), InvalidParameterError, r"temperature must be a number in \[0, 2\]"),
    (dict(temperature=-0.1), InvalidParameterError, r"temperature must be in \[0.0, 2.0\]"),
    (dict(temperature=2.5), InvalidParameterError, r"temperature must be in \[0.0, 2.0\]"),
    (dict(temperature="hot"), InvalidParameterError, r"temperature must be a number"),
    (dict(top_p=0), InvalidParameterError, r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), InvalidParameterError, r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=math.nan), InvalidParameterError, r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=0), InvalidParameterError, r"top_k must be -1, None or an integer >= 1"),
    (dict(top_k=-2), InvalidParameterError, r"top_k must be -1, None or an integer >= 1"),
    (dict(top_k=2.5), InvalidParameterError, r"top_k must be -1, None or an integer >= 1"),
    (dict(presence_penalty=-0.5), InvalidParameterError, r"presence_penalty must be in \[0.0, 2.0\]"),
    (dict(frequency_penalty=2.5), InvalidParameterError, r"frequency_penalty must be in \[0.0, 2.0\]"),
    (dict(frequency_penalty=math.inf), InvalidParameterError, r"frequency_penalty must be a number in \[0, 2\]"),
    (dict(timeout=0), InvalidParameterError, r"timeout must be a finite number of seconds > 0"),
    (dict(timeout=-1), InvalidParameterError, r"timeout must be a finite number of seconds > 0"),
    (dict(timeout=math.inf), InvalidParameterError, r"timeout must be a finite number of seconds > 0"),
    (dict(timeout=math.nan), InvalidParameterError, r"timeout must be a finite number of seconds > 0"),
    (dict(seed=-1), InvalidParameterError, r"seed must be an integer in \[0, 18446744073709551615\]"),
    (dict(seed="42"), InvalidParameterError, r"seed must be an integer"),
    (dict(stop_sequences=[""]), InvalidParameterError, "stop_sequences must be a list of non-empty strings"),
    (dict(stop_sequences=[1]), InvalidParameterError, "stop_sequences must be a list of non-empty strings"),
    (dict(return_token_log_probs="yes"), InvalidParameterError, "return_token_log_probs must be True or False"),
    (dict(include_stop_str_in_output=1), InvalidParameterError, "include_stop_str_in_output must be True or False"),
    (dict(skip_special_tokens="no"), InvalidParameterError, "skip_special_tokens must be True or False"),
    (dict(model_name="no-such-model"), UnknownModelError, "unknown model 'no-such-model'.*smollm2-135m-instruct"),
    (dict(model_name=42), InvalidParameterError, "model_name must be a registered model name or a checkpoint folder"),
    (dict(model_name=None), InvalidParameterError, "model_name is required"),
    (dict(model_name=TINY, model="other"), InvalidParameterError, "model_name or its alias model, not both"),
]


@pytest.mark.parametrize("mode", ["create", "stream", "acreate", "astream"])
@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_bad_inputs_are_refused_before_any_work(tiny, mode, bad, error, message):
    kwargs = dict(model_name=tiny, prompt="Hello", max_new_tokens=2)
    kwargs.update({k: tiny if v is TINY else v for k, v in bad.items()})
    if mode.endswith("stream"):
        kwargs["stream"] = True
    with watch(tiny) as calls:
        with pytest.raises(error, match=message) as raised:
            if mode.startswith("a"):
                asyncio.run(Completion.acreate(**kwargs))
            else:
                Completion.create(**kwargs)  # a stream's errors come at the call, not at the first chunk
        assert calls == []
    assert isinstance(raised.value, ValueError)
    assert Completion.create(tiny, "Hello", 2).output.num_completion_tokens == 2  # still serving


def test_the_stream_flag_must_be_a_bool(tiny):
    with pytest.raises(InvalidParameterError, match="stream must be True or False"):
        Completion.create(tiny, "Hello", stream="yes")
