"""Shared fixtures. Everything runs offline: the Hub is switched off before transformers is imported, and
HF_HOME points at a temporary folder so nothing from this machine's cache leaks into a test."""

import os
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
