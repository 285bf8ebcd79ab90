"""How each step runs (eagerly or compiled, in which form, for which shapes), decided here and
not in the model; and compiled steps without the wait: built in the background, switched to
between steps.

The model has one plain forward, with the reference's products: called directly (a trace, a
user's experiment) it computes transformers' numbers bit for bit. The runner's eager passes run
a *twin* of the model instead: the same parameters, buffers and hooks (no copy of any tensor),
with each projection in a form of its own. On a CPU computing float32 that form multiplies with
oneDNN (`in_eager_form`), 1.25-1.35x faster than the reference's MKL product on SmolLM2's steps,
equal to it within rounding. A compiled step is `torch.compile` of the forward on another twin,
each projection in the form that suits the step. A one-row, one-token step is a matrix-vector
product, which inductor emits as one vectorised pass over the weight that upcasts (or decodes
quantized codes) as it reads, at memory speed (`OneTokenLinear`, and a quantized module's
`matvec`); a step of several rows keeps the stock matrix products (a quantized weight
dequantized inside the graph).

Compiled shapes are static and few: a decode step's rows are padded up to a bucket of
`ROW_BUCKETS` (by the runner) and its cache view is a multiple of 256 positions, so at most a
handful of (rows, length) pairs occur. Which rows are compiled without being asked is
`auto_rows`: on a GPU every bucket (where the engine compiles at all: by default it replays its
steps as CUDA graphs instead, see `graphs.py`); on CPU only one row, because there a compiled
step of several rows gains little or loses against the eager matrix products: SmolLM2, 2
threads, 256 positions, AVX-512: 8 rows 80 ms compiled against 88 eager (alternated, medians of
5), 16 and 32 rows 114 and 198 ms against 100 and 154 (one run each, both with MKL's products),
for about 50 s of compiling per shape. So several rows stay eager, unpadded. `torch.compile`
costs 35-70 s per shape on a cold cache (about 10 s warm, from inductor's disk cache), which a
process that serves for minutes should not pay up front or in the middle of a stream. So the
engine serves eagerly; once it has decoded `after_tokens` tokens (it is not a one-shot run),
each (rows, length) it meets is compiled by a thread of our own, on a scratch cache laid out
like the pool (so the graph's guards hold for the real one), and used from the next step on. A
failure leaves the engine eager, with a warning. `compile_steps(model)` instead has every runner
on that model compile each shape in the foreground, the first time it runs it (the
single-sequence `generate()` and the benchmarks).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..model.decoder import CausalLM, Linear
from ..model.kv_cache import KVCache

logger = logging.getLogger(__name__)

COMPILE_AFTER_TOKENS = 256  # decoded tokens before the background compile starts
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a decode step's rows are padded up to one of these
RECOMPILE_LIMIT = 256  # one graph per (rows, length) compiled: far more than dynamo's default 8
EXIT_JOIN_SECONDS = 300.0  # a cold compile takes 35-40 s on 2 quiet cores, minutes on a busy machine

Step = Callable[..., torch.Tensor]
Shape = tuple[int, int]  # (rows, cache length) of a decode step


def row_bucket(rows: int, pool_rows: int) -> int:
    """The rows a decode step of `rows` sequences is padded to: the next bucket, at most the pool's."""
    return min(next((b for b in ROW_BUCKETS if b >= rows), rows), pool_rows)


class OneTokenLinear(Linear):
    """A projection's one-token form: x @ W.T written as multiply-and-sum, which inductor turns
    into a single pass over the weight (the stock kernels are 2x (float32) to 10x (half) slower
    on CPU for one row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1)  # (..., 1, in) * (out, in) -> (..., 1, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# A call to oneDNN's product costs ~14 us more than one to MKL's, whatever the size: SmolLM2's
# key and value projections (110,592 values) were faster with MKL at a few rows, its 331,776-value
# ones with oneDNN.
ONEDNN_FROM = 1 << 18
_onednn_forms: dict[type, type | None] = {}  # a projection class -> its form with oneDNN's product


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, float32 on the CPU, by oneDNN rather than by MKL (`F.linear`'s): on SmolLM2's
    shapes (2 threads, AVX-512) whole decode steps of 1 to 32 rows and prompt passes run
    1.25-1.35x faster, the head about 2x at a few rows. The same products summed in another
    order: within rounding of the reference's numbers, not equal to them bit for bit."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _onednn_form(module: nn.Module) -> type | None:
    """`module`'s class with oneDNN's product, for a projection whose product is `F.linear` and
    whose weight has `ONEDNN_FROM` values or more."""
    cls = type(module)
    if getattr(module, "in_features", 0) * getattr(module, "out_features", 0) < ONEDNN_FROM:
        return None
    if cls not in _onednn_forms:
        stock = getattr(cls, "product", None) is torch.nn.functional.linear
        form = type(f"OneDnn{cls.__name__}", (cls,), {"product": staticmethod(onednn_linear)})
        _onednn_forms[cls] = form if stock else None
    return _onednn_forms[cls]


_eager: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def in_eager_form(model: CausalLM) -> nn.Module:
    """What eager passes (the runner's, `llm.score`'s) run for `model`: on a CPU computing in
    float32 where torch has oneDNN, its twin with every projection's product oneDNN's (made once
    per model); elsewhere the model itself. The model's own forward keeps the reference's product,
    so that a trace or a direct call gives transformers' numbers bit for bit."""
    fast = model.compute_dtype == torch.float32 and model.lm_head.weight.device.type == "cpu"
    if not (fast and torch.backends.mkldnn.is_available()):
        return model
    if model not in _eager:
        _eager[model] = twin(model, _onednn_form)
    return _eager[model]


def _matvec_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A quantized projection's one-token form: its `matvec`, which reads the codes once."""
    y = self.matvec(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features).to(x.dtype)
    return y if self.bias is None else y + self.bias.to(y.dtype)


def _dequantized_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A quantized projection's form for several rows in a compiled step: its weight dequantized
    (into memory of the graph's own: the eager form's shared buffer would be a side effect) and
    the stock product."""
    y = torch.nn.functional.linear(x, self.dequantized_in_graph().to(x.dtype))  # (..., T, out)
    return y if self.bias is None else y + self.bias.to(y.dtype)


_forms: dict[tuple[type, bool], type | None] = {(Linear, True): OneTokenLinear}


def _form(module: nn.Module, one_row: bool) -> type | None:
    """The class a compiled step puts `module` in (None: its own): for one row, `OneTokenLinear`
    for our projections; for a quantized projection (a module with `out_features`, `matvec` and
    `dequantized_in_graph`), a subclass whose forward is `matvec` (one row) or the stock product
    of the dequantized weight (several)."""
    cls = type(module)
    if (cls, one_row) not in _forms:
        form = None
        quantized = callable(getattr(cls, "matvec", None)) and callable(getattr(cls, "dequantized_in_graph", None))
        if quantized and hasattr(module, "out_features"):
            name, forward = ("OneToken", _matvec_forward) if one_row else ("Batched", _dequantized_forward)
            form = type(f"{name}{cls.__name__}", (cls,), {"forward": forward})
        _forms[cls, one_row] = form
    return _forms[cls, one_row]


def twin(module: nn.Module, forms: Callable[[nn.Module], type | None]) -> nn.Module:
    """A copy of `module`'s tree sharing every parameter, buffer and hook (nothing is copied but
    the module objects), with each module whose class `forms` maps put in that class."""
    double = copy.copy(module)  # shares _parameters, _buffers and hooks with the original
    double._modules = {name: twin(child, forms) for name, child in module._modules.items()}
    form = forms(module)
    if form is not None:
        double.__class__ = form
    return double


def in_step_form(module: nn.Module, rows: int) -> nn.Module:
    """What a compiled decode step of `rows` rows runs for `module`: its twin with every
    projection in the form for that many rows (see `_form`)."""
    for part in module.modules():
        if isinstance(part, Linear):  # the one-token product streams a row-major (out, in) weight best
            part.weight.data = part.weight.data.contiguous()
    return twin(module, lambda part: _form(part, rows == 1))


def compile_step(model: CausalLM, rows: int, mode: str = "default") -> Step:
    """`torch.compile` of a decode step of `rows` rows (static shapes); it compiles when first called."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(in_step_form(model, rows).forward, mode=mode, fullgraph=True, dynamic=False)


_foreground: weakref.WeakKeyDictionary[CausalLM, str] = weakref.WeakKeyDictionary()


def compile_steps(model: CausalLM, mode: str = "default") -> None:
    """Have every runner on `model` without a background compiler compile each decode shape the
    first time it runs it, in the foreground (the first costs about a minute on 2 cores).

    On a GPU, `mode="reduce-overhead"` replays the step as a CUDA graph (the cache's tensors are
    marked static: see `KVCache`).
    """
    _foreground[model] = mode


class ForegroundCompile:
    """Compiled steps for a runner whose caller asked for them (`compile_steps`): built in place."""

    def __init__(self, model: CausalLM, mode: str) -> None:
        self.model, self.mode = model, mode
        self.steps: dict[int, Step] = {}
        self.decoded = 0

    def step_for(self, rows: int, length: int) -> Step | None:
        if rows not in self.steps:
            self.steps[rows] = compile_step(self.model, rows, self.mode)
        return self.steps[rows]


def foreground_compiler(model: CausalLM) -> ForegroundCompile | None:
    mode = _foreground.get(model)
    return None if mode is None else ForegroundCompile(model, mode)


class BackgroundCompile:
    def __init__(self, model: CausalLM, max_len: int, after_tokens: int = COMPILE_AFTER_TOKENS) -> None:
        self.model = model
        self.max_len = max_len
        self.after_tokens = after_tokens
        self.decoded = 0
        on_gpu = model.lm_head.weight.device.type == "cuda"
        self.auto_rows = set(ROW_BUCKETS) if on_gpu else {1}  # rows compiled when met (module docstring)
        self.compiled: dict[Shape, Step] = {}  # (rows, cache length) -> compiled step
        self.seconds: dict[Shape, float] = {}
        self._asked: set[Shape] = set()
        self._todo: queue.SimpleQueue[Shape | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()  # notified after each compile, built or failed
        self.failed = False  # a compile raised: the engine stays eager

    def step_for(self, rows: int, length: int) -> Step | None:
        """The compiled step for a decode of `rows` (bucketed) rows over `length` cache positions,
        if built; else None (run eagerly), and have it built when the engine has served long enough."""
        if self.failed:
            return None
        shape = (rows, length)
        if rows in self.auto_rows and shape not in self._asked and self.decoded >= self.after_tokens:
            self.ask(shape)
        return self.compiled.get(shape)

    def ask(self, shape: Shape) -> None:
        """Queue `shape` (rows, cache length) for compiling (once), whatever `auto_rows` says."""
        if shape not in self._asked:
            self._asked.add(shape)
            self._todo.put(shape)
            self._start()

    def wait(self, shapes: Iterable[Shape], timeout: float | None) -> bool:
        """Queue `shapes` (see `ask`) and block until each is compiled (True), or until a compile
        failed or `timeout` seconds (None: no limit) passed (False): for callers that must not
        share the CPUs with a compile, such as benchmarks and tests."""
        shapes = list(shapes)
        for shape in shapes:
            self.ask(shape)

        def built() -> bool:
            return all(shape in self.compiled for shape in shapes)

        with self._progress:
            self._progress.wait_for(lambda: self.failed or built(), timeout)
            return built()

    def stop(self, join_seconds: float = EXIT_JOIN_SECONDS) -> None:
        """Compile nothing more, and wait for a compile under way to end: a thread still inside
        torch while the interpreter exits can abort the process, and a compile cannot be cut short."""
        if self._thread is None:
            return
        self._todo.put(None)
        if self._thread.is_alive():
            logger.info("waiting for the background compile under way to end (at most %.0f s)", join_seconds)
        self._thread.join(join_seconds)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nanoengine-compile", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while (shape := self._todo.get()) is not None:
            start = time.monotonic()
            try:
                step = self._compile(*shape)
            except Exception:  # the eager step is still there: keep serving with it
                logger.warning("compiling the decode step failed; staying eager", exc_info=True)
                with self._progress:
                    self.failed = True
                    self._progress.notify_all()
                return
            with self._progress:
                self.seconds[shape] = time.monotonic() - start
                self.compiled[shape] = step
                self._progress.notify_all()
            logger.info("decode step for %d rows x %d cache positions compiled in %.0f s (in the background)", *shape, self.seconds[shape])

    def _compile(self, rows: int, length: int) -> Step:
        """Compile the step for `rows` rows over `length` positions and run it once on a scratch cache."""
        model, device = self.model, self.model.lm_head.weight.device
        step = compile_step(model, rows)
        scratch = KVCache(model.config, rows, self.max_len, model.compute_dtype, device, zero_lazily=True)
        with torch.inference_mode():
            ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
            step(ids, torch.full((rows, 1), length - 1, device=device), scratch.view(rows, length), True)
        return step
