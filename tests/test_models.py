"""Model options and the process-wide model cache."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from nanoengine import Completion, InvalidParameterError, UnknownModelError, configure, engine
from nanoengine.models import FairLock, get_model, model_options
from nanoengine.loading import resolve_dtype


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    """Each test starts from the defaults and leaves the process settings as it found them."""
    monkeypatch.setattr(engine, "_settings", engine._Settings())
    monkeypatch.delenv(engine.DTYPE_ENV, raising=False)
    monkeypatch.delenv(engine.DEVICE_ENV, raising=False)


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
        (dict(dtype="int4"), "dtype must be one of"),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'auto'"),
        (dict(compile="yes"), "compile must be True or False"),
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


def test_compiled_model_gives_the_same_text(tiny_folder):
    """compile=True wraps the model in torch.compile (slow to compile on CPU: ~20 s here)."""
    plain = Completion.create(str(tiny_folder), "Hello there", max_new_tokens=4, temperature=0)
    configure(compile=True)
    compiled = Completion.create(str(tiny_folder), "Hello there", max_new_tokens=4, temperature=0, timeout=300)
    assert get_model(str(tiny_folder)).options.compile
    assert compiled.output.text == plain.output.text


def test_fair_lock_is_granted_in_arrival_order_and_times_out():
    lock = FairLock()
    assert lock.acquire()
    order = []

    def waiter(i):
        assert lock.acquire(timeout=10)
        order.append(i)
        lock.release()

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)  # so the arrival order is known
    start = time.monotonic()
    assert not lock.acquire(timeout=0.1)  # held: times out, and leaves the queue
    assert 0.09 < time.monotonic() - start < 1.0
    lock.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3]
    assert lock.acquire(timeout=0)
