"""Model options and the process-wide model cache."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from nanoengine import Completion, InvalidParameterError, UnknownModelError, configure
from nanoengine.api import models as engine
from nanoengine.engine.loop import EngineSettings
from nanoengine.api.models import engine_settings, get_model, model_options
from nanoengine.weights.loading import resolve_dtype


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    """Each test starts from the defaults and leaves the process settings as it found them."""
    monkeypatch.setattr(engine, "_settings", engine._Settings())
    monkeypatch.delenv(engine.DTYPE_ENV, raising=False)
    monkeypatch.delenv(engine.DEVICE_ENV, raising=False)
    for variable in engine.ENGINE_ENV.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def tiny_folder(tmp_path, smollm2_folder):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny", vocab_size=49152)
    shutil.copy(smollm2_folder / "tokenizer.json", folder)
    return folder


def test_defaults_are_float32_on_cpu():
    assert model_options() == engine.ModelOptions(torch.float32, torch.device("cpu"), compile=False)


def test_configure_sets_the_options_and_leaves_the_rest():
    configure(dtype="bfloat16")
    configure(compile=True)
    assert model_options() == engine.ModelOptions(torch.bfloat16, torch.device("cpu"), compile=True)
    configure(dtype="auto", device="cpu")
    assert model_options().dtype == resolve_dtype("auto", torch.device("cpu"), compiled=True)  # the fastest, not the default
    configure(compile=False)  # uncompiled, half weights are slower than float32 on CPU: auto keeps float32
    assert model_options().dtype == torch.float32


def test_environment_variables_set_the_defaults_and_configure_wins(monkeypatch):
    monkeypatch.setenv("NANOENGINE_DTYPE", "float16")
    monkeypatch.setenv("NANOENGINE_DEVICE", "cpu")
    assert model_options().dtype == torch.float16
    configure(dtype="float32")
    assert model_options().dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float64"), r"dtype must be one of .*, auto; not 'float64' \(set by configure\(\)\)"),
        (dict(dtype="int3"), "dtype must be one of"),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'auto'"),
        (dict(compile="yes"), "compile must be True or False"),
        (dict(cuda_graphs="sometimes"), r"cuda_graphs must be on or off .*configure\(\)"),
    ],
)
def test_configure_refuses_bad_options(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        configure(**kwargs)
    assert model_options() == engine.ModelOptions(torch.float32, torch.device("cpu"))  # unchanged


@pytest.mark.parametrize("variable, value", [("NANOENGINE_DTYPE", "float8"), ("NANOENGINE_DEVICE", "abacus")])
def test_a_bad_environment_variable_is_named(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidParameterError, match=rf"\${variable}"):
        model_options()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(InvalidParameterError, match="no CUDA device"):
        configure(device="cuda")


def test_a_model_is_loaded_once_per_folder_and_options_even_when_asked_for_at_once(tiny_folder, monkeypatch):
    loads = []
    real_load = engine.load_model

    def counting_load(*args, **kwargs):
        loads.append(kwargs["dtype"])
        time.sleep(0.2)  # widen the window in which the threads race
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine, "load_model", counting_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(get_model(str(tiny_folder)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and all(m is got[0] for m in got)
    assert get_model(tiny_folder / ".." / tiny_folder.name) is got[0]  # the same folder, spelt otherwise
    configure(dtype="bfloat16")
    other = get_model(str(tiny_folder))
    assert other is not got[0] and other.model.lm_head.weight.dtype == torch.bfloat16
    assert loads == [torch.float32, torch.bfloat16]


def test_a_registered_name_and_its_folder_share_one_model(smollm2_folder):
    assert get_model("smollm2-135m-instruct") is get_model(str(smollm2_folder))


def test_unknown_model_lists_the_registered_ones(tmp_path):
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        get_model("no-such-model")


def test_compile_true_compiles_from_the_first_step_and_gives_the_same_text(tiny_folder):
    """compile=True: the engine compiles its one-sequence step at once, in the background (slow
    to compile on CPU: ~20 s here), and serves eagerly until it is ready."""
    plain = Completion.create(str(tiny_folder), "Hello there", max_new_tokens=4, temperature=0)
    configure(compile=True)
    loaded = get_model(str(tiny_folder))
    assert loaded.options.compile and loaded.engine.compiler.after_tokens == 0
    first = Completion.create(str(tiny_folder), "Hello there", max_new_tokens=4, temperature=0, timeout=300)
    compiler, end = loaded.engine.compiler, time.monotonic() + 900
    while not compiler.compiled and not compiler.failed and time.monotonic() < end:
        time.sleep(0.1)
    assert [rows for rows, _ in compiler.compiled] == [1], "the one-row step was not compiled"
    compiled = Completion.create(str(tiny_folder), "Hello there", max_new_tokens=4, temperature=0, timeout=300)
    assert first.output.text == compiled.output.text == plain.output.text


def test_engine_settings_come_from_configure_then_the_environment_then_the_defaults(monkeypatch):
    assert engine_settings() == EngineSettings()
    monkeypatch.setenv("NANOENGINE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("NANOENGINE_PREFILL_CHUNK", "64")
    assert engine_settings() == EngineSettings(max_batch_size=4, prefill_chunk=64)
    configure(max_batch_size=2, max_seq_len=512)
    assert engine_settings() == EngineSettings(max_batch_size=2, max_seq_len=512, prefill_chunk=64)
    assert model_options().engine == engine_settings()  # part of the cache key


@pytest.mark.parametrize("value", [0, -1, 2.5, "many", True])
def test_bad_engine_settings_are_named(monkeypatch, value):
    with pytest.raises(InvalidParameterError, match="max_batch_size must be an integer >= 1.*configure"):
        configure(max_batch_size=value)
    monkeypatch.setenv("NANOENGINE_PREFILL_CHUNK", str(value))
    with pytest.raises(InvalidParameterError, match=r"prefill_chunk must be an integer >= 1.*\$NANOENGINE_PREFILL_CHUNK"):
        engine_settings()


def test_the_kv_pool_is_sized_once_from_the_settings(tiny_folder):
    """Rows x longest sequence, whatever requests ask for; a request longer than a row is refused."""
    configure(max_batch_size=3, max_seq_len=64)
    loaded = get_model(str(tiny_folder))
    config = loaded.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert loaded.engine.kv_cache_bytes == 3 * 64 * per_token
    with pytest.raises(InvalidParameterError, match="longest sequence of 64 tokens.*max_seq_len"):
        Completion.create(str(tiny_folder), "Hello", max_new_tokens=100)
