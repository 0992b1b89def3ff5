"""Shared fixtures. Everything runs offline: the Hub is switched off before transformers is imported, and
HF_HOME points at a temporary folder so nothing from this machine's cache leaks into a test."""

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="clipqwen-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Hub files live at the repository root

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clipqwen.presets import bundled_processor, tiny_config  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402

PHOTOS = ROOT / "examples" / "coco-cc-by"


@pytest.fixture(scope="session")
def processor():
    return bundled_processor()


@pytest.fixture
def make_model():
    def make(seed: int = 0, **config_overrides):
        torch.manual_seed(seed)
        return ClipQwenForConditionalGeneration(tiny_config(**config_overrides)).eval()

    return make


@pytest.fixture(scope="session")
def photos():
    return [Image.open(path) for path in sorted(PHOTOS.glob("*.jpg"))[:4]]


@pytest.fixture(scope="session")
def runtime_python():
    """A Python with only what a user's `pip install -e .` installs (no test extras), for the runtime smoke tests:
    $CLIPQWEN_RUNTIME_PYTHON (.ci/run makes one with the pinned versions and one with the newest allowed), else a
    venv in build/, made once per setup.cfg + constraints.txt."""
    if os.environ.get("CLIPQWEN_RUNTIME_PYTHON"):
        return os.environ["CLIPQWEN_RUNTIME_PYTHON"]
    stamp = hashlib.sha256((ROOT / "setup.cfg").read_bytes() + (ROOT / "constraints.txt").read_bytes()).hexdigest()
    venv = ROOT / "build" / "runtime-venv"
    python = venv / "bin" / "python"
    if not (venv / "stamp").is_file() or (venv / "stamp").read_text() != stamp:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build on this machine's disk
        subprocess.run([*pip, "-e", str(ROOT), "-c", str(ROOT / "constraints.txt")], check=True)
        (venv / "stamp").write_text(stamp)
    return str(python)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode with no Hub: its endpoint a closed port (connection refused at once; a network that drops
    packets silently costs the probe's 3 s timeout)."""
    import datasets.config
    from huggingface_hub import constants

    from clipqwen import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_PROBES", {})
