"""The engine loop: batched equals solo, requests joining and leaving mid-flight, chunked prefill,
many concurrent callers, and nothing left behind.

"Solo" is the single-sequence `generate()` loop (its own KV cache, batch of one), an independent
path through the model: the engine must give each request exactly its tokens, with log-probs
within 1e-4 (batched float32 sums in another order).
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
import time
import weakref
from dataclasses import dataclass

import pytest
import torch

from nanoengine import Completion, SamplingParams, Tokenizer, generate, load_model
from nanoengine.engine.compiling import BackgroundCompile
from nanoengine.engine.loop import Engine, EngineSettings
from nanoengine.api.models import get_model
from nanoengine.api.outputs import Mailbox, OutputBuilder
from nanoengine.params import CompletionParams
from conftest import wait_until  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made across Europe. Before it, scribes copied every page by hand, and a single Bible could "
    "take years to finish. Within fifty years of the first press, printers in more than two hundred cities "
    "had produced millions of books, and ideas travelled faster than ever before. "
)


def request(max_new_tokens: int = 16, timeout: float = 300, **sampling):
    """A checked request; the prompt text is a placeholder, the tests submit token ids."""
    params = dict(model_name="x", prompt="x", max_new_tokens=max_new_tokens, temperature=0, timeout=timeout, return_token_log_probs=True)
    return CompletionParams(**{**params, **sampling})


@dataclass
class Result:
    tokens: list[str]
    logprobs: list[float]
    text: str
    error: BaseException | None = None


class Submitted:
    """A request in the engine, read as the request side reads it: its mailbox's tokens through
    an output builder (detokenizer and stop strings), aborted once a stop string completes."""

    def __init__(self, engine: Engine, request: CompletionParams, prompt_ids: list[int], deadline: float) -> None:
        self.builder = OutputBuilder(request, TOKENIZERS[engine], engine.eos_ids, len(prompt_ids))
        self.handle = engine.submit(request, prompt_ids, deadline, Mailbox())

    def abort(self) -> None:
        self.handle.abort()


submit = Submitted
TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its model's tokenizer


def read(submitted: Submitted) -> Result:
    """Everything a request's reader gets, until the last chunk or an error."""
    result = Result([], [], "")
    while True:
        item = submitted.handle.mailbox.get(time.monotonic() + 300)
        if isinstance(item, BaseException):
            result.error = item
            return result
        for chunk in submitted.builder.add(item):
            result.text += chunk.text
            if chunk.token is not None:
                result.tokens.append(chunk.token.token)
                result.logprobs.append(chunk.token.log_prob)
            if chunk.finished:
                submitted.abort()  # as the request side does: the engine may not know of a stop string
                return result


def solo(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams | None = None) -> Result:
    steps = list(generate(model, prompt_ids, max_new_tokens, sampling))
    return Result([tokenizer.decode([s.id], False) for s in steps], [s.logprob for s in steps], "")


def assert_same(batched: Result, alone: Result) -> None:
    assert batched.error is None
    assert batched.tokens == alone.tokens
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


@pytest.fixture
def engine_for(request):
    """Engines made by a test, stopped after it."""
    engines = []

    def make(model, tokenizer, **settings) -> Engine:
        settings.setdefault("background_compile", False)  # compiling costs minutes: only where a test asks
        engines.append(Engine(model, EngineSettings(**settings)))
        TOKENIZERS[engines[-1]] = tokenizer
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


# --- Batched equals solo ---------------------------------------------------------------------


PROMPT_LENGTHS = [10, 25, 60, 120, 200, 310, 420, 500]


@pytest.fixture(scope="module")
def real_prompts(smollm2) -> list[list[int]]:
    ids = smollm2.tokenizer.encode(TEXT * 12)
    return [ids[i * 7 : i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS)]


def test_eight_real_prompts_batched_give_each_its_solo_greedy_tokens(smollm2, real_prompts, engine_for):
    engine = engine_for(smollm2.model, smollm2.tokenizer, max_batch_size=8, prefill_chunk=256)
    handles = [submit(engine, request(16), ids, time.monotonic() + 600) for ids in real_prompts]
    results = [read(h) for h in handles]
    for ids, got in zip(real_prompts, results):
        assert_same(got, solo(smollm2.model, smollm2.tokenizer, ids, 16))


MIXED = [
    dict(temperature=0.7, seed=1),
    dict(temperature=1.0, top_k=20, seed=2),
    dict(temperature=0.9, top_p=0.8, seed=3),
    dict(temperature=0),
    dict(temperature=1.3, top_k=50, top_p=0.95, presence_penalty=0.5, seed=4),
    dict(temperature=0, frequency_penalty=1.0),
    dict(temperature=0.5, frequency_penalty=0.3, presence_penalty=1.0, seed=5),
    dict(temperature=2.0, top_p=0.5, seed=6),
]


def test_seeded_sampling_with_mixed_parameters_is_the_same_batched_or_solo(smollm2, real_prompts, engine_for):
    engine = engine_for(smollm2.model, smollm2.tokenizer, max_batch_size=8, prefill_chunk=256)
    requests = [request(12, **options) for options in MIXED]
    handles = [submit(engine, r, ids, time.monotonic() + 600) for r, ids in zip(requests, real_prompts)]
    results = [read(h) for h in handles]
    for r, ids, got in zip(requests, real_prompts, results):
        assert_same(got, solo(smollm2.model, smollm2.tokenizer, ids, 12, SamplingParams.of(r)))


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "gemma3", "gpt2"])
def family_folder(request, tmp_path_factory):
    from conftest import save_tiny_llama
    from test_families import FAMILIES, byte_level_tokenizer_json

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        save_tiny_llama(folder, vocab_size=300)
    else:
        torch.manual_seed(0)
        FAMILIES[request.param]().eval().save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer_json(folder)
    return folder


def test_every_family_batched_equals_solo_past_the_sliding_window(family_folder, engine_for):
    """Prompts of 5 to 70 tokens, prefilled in chunks of 16, decoding to 40 tokens past a 16-token
    window, four rows in one batch."""
    model, tokenizer = load_model(family_folder), Tokenizer.from_folder(family_folder)
    engine = engine_for(model, tokenizer, max_batch_size=4, prefill_chunk=16)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 23, 40, 70)]
    handles = [submit(engine, request(30), ids, time.monotonic() + 600) for ids in prompts]
    for ids, handle in zip(prompts, handles):
        assert_same(read(handle), solo(model, tokenizer, ids, 30))


class PaddedEagerSteps:
    """A stand-in for the compiler whose "compiled" step is the model's own eager forward: the
    runner pads every decode step's rows up to its bucket exactly as for a compiled one."""

    def __init__(self, model) -> None:
        self.model, self.decoded, self.padded = model, 0, []

    def step_for(self, rows: int, length: int):
        self.padded.append(rows)
        return self.model


def test_every_family_padded_to_row_buckets_equals_solo(family_folder, engine_for):
    """Five rows decoding beside a half-prefilled prompt (whose row a padding row writes into),
    joining and leaving, each step's rows padded up to 1, 2, 4 or 8."""
    model, tokenizer = load_model(family_folder), Tokenizer.from_folder(family_folder)
    engine = engine_for(model, tokenizer, max_batch_size=8, prefill_chunk=16)
    engine.runner.compiler = steps = PaddedEagerSteps(model)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 9, 23, 12, 70)]
    handles = [submit(engine, request(12 + 4 * i), ids, time.monotonic() + 600) for i, ids in enumerate(prompts)]
    for i, (ids, handle) in enumerate(zip(prompts, handles)):
        assert_same(read(handle), solo(model, tokenizer, ids, 12 + 4 * i))
    assert set(steps.padded) <= {1, 2, 4, 8} and sum(steps.padded) > steps.decoded  # some steps were padded


# --- Requests joining and leaving mid-flight -------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_folder):
    """A random tiny Llama (context 4096) with SmolLM2's tokenizer: fast, with room for long prompts."""
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("engine") / "tiny", vocab_size=49152, max_position_embeddings=4096)
    shutil.copy(smollm2_folder / "tokenizer.json", folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_model(tiny), Tokenizer.from_folder(tiny)


def batch_sizes(model) -> tuple[list[tuple[int, int]], object]:
    """Record (rows, tokens per row) of every forward pass; the hook's handle removes it."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_requests_joining_leaving_aborted_timed_out_or_stopped_leave_the_others_unchanged(tiny_model, engine_for):
    model, tokenizer = tiny_model
    engine = engine_for(model, tokenizer, max_batch_size=8, prefill_chunk=64)
    prompts = [tokenizer.encode(f"Request {i}: {TEXT[: 40 + 30 * i]}") for i in range(6)]
    shapes, hook = batch_sizes(model)
    slow = model.register_forward_hook(lambda *args: time.sleep(0.003))  # room for the others to join
    try:
        deadline = time.monotonic() + 600
        first = [submit(engine, request(60), prompts[i], deadline) for i in range(2)]
        assert wait_until(lambda: any(tokens == 1 for rows, tokens in shapes))  # decoding: now the others arrive
        joining = submit(engine, request(40), prompts[2], deadline)
        aborted = submit(engine, request(200), prompts[3], deadline)
        late = submit(engine, request(200, timeout=0.2), prompts[4], time.monotonic() + 0.2)
        stopped = submit(engine, request(200, stop_sequences=["e"]), prompts[5], deadline)
        assert wait_until(lambda: len(shapes) >= 8)
        aborted.abort()
        results = [read(h) for h in (*first, joining)]
        timed_out, stopped_result = read(late), read(stopped)
    finally:
        hook.remove()
        slow.remove()
    for ids, n, got in zip(prompts[:3], (60, 60, 40), results):
        assert_same(got, solo(model, tokenizer, ids, n))
    assert isinstance(timed_out.error, TimeoutError)
    assert stopped_result.error is None and "e" not in stopped_result.text and len(stopped_result.tokens) < 200
    assert max(rows for rows, tokens in shapes if tokens == 1) >= 3  # they really shared decode steps
    assert wait_until(lambda: engine.active_requests == 0)



# --- Chunked prefill -------------------------------------------------------------------------


def test_a_long_prompt_delays_the_running_streams_by_one_chunk_at_most(tiny_model, engine_for):
    """While a 2,000-token prompt is prefilled in chunks of 128, the two running streams get a
    token between every two chunks, and the prompt's own answer is its solo answer."""
    model, tokenizer = tiny_model
    engine = engine_for(model, tokenizer, max_batch_size=4, prefill_chunk=128)
    long_prompt = tokenizer.encode(TEXT * 30)[:2000]
    shapes, hook = batch_sizes(model)
    try:
        deadline = time.monotonic() + 600
        running = [submit(engine, request(200), tokenizer.encode(f"Stream {i}:"), deadline) for i in range(2)]
        assert wait_until(lambda: (2, 1) in shapes)  # both streams decode together
        before = len(shapes)
        newcomer = submit(engine, request(8), long_prompt, deadline)
        got = read(newcomer)
        for handle in running:
            handle.abort()
    finally:
        hook.remove()
    assert_same(got, solo(model, tokenizer, long_prompt, 8))
    chunks = [i for i, (rows, tokens) in enumerate(shapes) if i >= before and tokens > 1]
    assert len(chunks) >= 2000 // 128
    assert all(rows * tokens <= 128 for rows, tokens in shapes if tokens > 1)
    for a, b in zip(chunks, chunks[1:]):
        assert b - a == 2 and shapes[a + 1] == (2, 1)  # one decode step of both streams between chunks


def test_an_abort_or_a_timeout_is_honoured_between_chunks_of_a_long_prefill(tiny_model, engine_for):
    """A 2,000-token prompt in chunks of 64 (each slowed to 50 ms): aborted, or out of time, it
    stops being prefilled at the next chunk, long before its 32 chunks are done."""
    model, tokenizer = tiny_model
    engine = engine_for(model, tokenizer, max_batch_size=2, prefill_chunk=64)
    long_prompt = tokenizer.encode(TEXT * 30)[:2000]
    shapes, hook = batch_sizes(model)
    slow = model.register_forward_hook(lambda *args: time.sleep(0.05))
    try:
        handle = submit(engine, request(8), long_prompt, time.monotonic() + 600)
        assert wait_until(lambda: len(shapes) >= 3)
        handle.abort()
        assert wait_until(lambda: engine.active_requests == 0)
        aborted_at = len(shapes)
        late = submit(engine, request(8, timeout=0.3), long_prompt, time.monotonic() + 0.3)
        assert isinstance(read(late).error, TimeoutError)
        assert wait_until(lambda: engine.active_requests == 0)
    finally:
        hook.remove()
        slow.remove()
    assert aborted_at < 2000 // 64 and len(shapes) - aborted_at < 2000 // 64


# --- Many callers at once ---------------------------------------------------------------------


def test_32_async_streams_and_32_threads_each_get_exactly_their_solo_text(tiny):
    folder = str(tiny)
    requests = [dict(prompt=f"Caller {i} says", max_new_tokens=10, temperature=1.0, seed=i) for i in range(64)]
    expected = [Completion.create(folder, timeout=120, **r).output.text for r in requests]
    assert len(set(expected)) > 60
    engine = get_model(folder).engine

    def round_of_64() -> list[str]:
        results: dict[int, str] = {}

        def in_thread(i):
            results[i] = Completion.create(folder, timeout=300, **requests[i]).output.text

        async def in_task(i):
            stream = await Completion.acreate(folder, timeout=300, stream=True, **requests[i])
            results[i] = "".join([chunk.output.text async for chunk in stream])

        async def tasks():
            await asyncio.gather(*(in_task(i) for i in range(32, 64)))

        threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
        return [results[i] for i in range(64)]

    assert round_of_64() == expected
    assert wait_until(lambda: engine.active_requests == 0)
    assert not engine.scheduler.decoding and engine.scheduler.partial is None and not engine.scheduler.waiting
    gc.collect()
    assert round_of_64() == expected  # a second round finds everything as the first left it
    # The kept views of the pool are bounded by its shape classes (rows x length buckets), not by requests.
    assert len(engine.runner.cache._views) <= engine.settings.max_batch_size * engine.max_seq_len // 256
    # No per-request thread is left: only engines' loops (and the compile workers of engines that
    # earlier tests loaded with compile=True, which live as long as their cached model).
    assert all(t.name in ("nanoengine-engine", "nanoengine-compile") for t in threading.enumerate() if t.name.startswith("nanoengine"))


# --- Memory --------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_flood_of_huge_requests_stays_within_the_kv_pool(smollm2, engine_for):
    """32 requests for 1,000 new tokens each: 4 run, 28 wait, and memory grows by the pool at most.

    (Before the engine each request reserved its own cache up front: 32 x 1,020 positions x 46 kB
    = 1.5 GB for SmolLM2.)"""
    engine = engine_for(smollm2.model, smollm2.tokenizer, max_batch_size=4, max_seq_len=1024)
    config = smollm2.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert engine.kv_cache_bytes == 4 * 1024 * per_token  # 188 MB, allocated once
    prompts = [smollm2.tokenizer.encode(f"Write a very long essay about topic number {i}.") for i in range(32)]
    before = resident_bytes()
    deadline = time.monotonic() + 600
    handles = [submit(engine, request(1000, return_token_log_probs=False), ids, deadline) for ids in prompts]
    try:
        assert wait_until(lambda: engine.steps >= 40, seconds=300)
        grown = resident_bytes() - before
        assert engine.scheduler.running == 4 and len(engine.scheduler.waiting) == 28
    finally:
        for handle in handles:
            handle.abort()
    assert grown < 4 * 1024 * per_token + 64 * 2**20  # 188 MB
    assert wait_until(lambda: engine.active_requests == 0)


# --- Compiled in the background --------------------------------------------------------------


def test_waiting_for_a_compile_that_fails_returns_false_without_waiting_out_the_timeout(tiny):
    compiler = BackgroundCompile(load_model(tiny), 256, after_tokens=0)

    def broken(rows: int, length: int):
        raise RuntimeError("no compiler on this machine")

    compiler._compile = broken
    start = time.monotonic()
    assert compiler.wait([(1, 256)], timeout=600) is False
    assert compiler.failed and time.monotonic() - start < 300
    compiler.stop()


def test_the_background_compile_switches_over_between_steps_and_keeps_greedy_output(tiny, engine_for):
    model, tokenizer = load_model(tiny), Tokenizer.from_folder(tiny)
    prompts = [tokenizer.encode(f"Compiled or not, request {i} reads {TEXT[: 20 + 25 * i]}") for i in range(3)]
    eager = [solo(model, tokenizer, ids, 24) for ids in prompts]
    engine = engine_for(model, tokenizer, max_batch_size=4, background_compile=True)
    compiler = engine.compiler
    compiler.after_tokens = 0  # start at the first decode step
    deadline = time.monotonic() + 900
    assert_same(read(submit(engine, request(24), prompts[0], deadline)), eager[0])  # served eagerly meanwhile
    assert wait_until(lambda: (1, 256) in compiler.compiled, seconds=900), "the background compile did not finish"
    calls = []
    for shape in [(1, 256), (4, 256)]:
        assert compiler.wait([shape], timeout=900), f"compiling {shape} did not finish"
        compiled = compiler.compiled[shape]
        compiler.compiled[shape] = lambda *args, step=compiled, rows=shape[0]: calls.append(rows) or step(*args)
    for ids, expected in zip(prompts, eager):  # one row: the compiled one-token step
        assert_same(read(submit(engine, request(24), ids, deadline)), expected)
    assert calls == [1] * 3 * 23
    handles = [submit(engine, request(24), ids, deadline) for ids in prompts]  # three rows, padded to four
    for handle, expected in zip(handles, eager):
        assert_same(read(handle), expected)
    assert 4 in calls
