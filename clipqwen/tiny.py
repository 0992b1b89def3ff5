"""A captioner that needs no download (the offline demo, tests, benchmarks): tiny configs of the real
structure, and the real Qwen3 tokenizer that ships gzipped in assets/, unpacked once into the HF cache.

The tiny configs mirror the real structure at a size a CPU trains in minutes: 7×7 patches plus CLS,
GQA (2 KV heads for 4 query heads), an explicit head_dim, tied embeddings, the real vocabulary.
"""

import gzip
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer

# The three model files live at the repository root, which is also the shape of the Hub repository.
from configuration_clipqwen import ClipQwenConfig
from processing_clipqwen import ClipQwenProcessor

from .backbones.assemble import tower_image_processor
from .hub import clipqwen_cache_dir


BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "qwen3-tokenizer"

# one width for both transformers: 2 layers of 64 with 4 heads
TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(**TINY_WIDTH, image_size=224, patch_size=32, projection_dim=32)
# EfficientNet at toy size: total stride 32 as in the real one; width_coefficient scales all widths
TINY_EFFICIENTNET = dict(
    model_type="efficientnet",
    image_size=224,
    width_coefficient=0.1,
    depth_coefficient=1.0,
    hidden_dim=128,
    hidden_act="relu6",
    in_channels=[32, 16, 24, 40],
    out_channels=[16, 24, 40, 80],
    kernel_sizes=[3, 3, 5, 3],
    strides=[2, 2, 2, 2],
    num_block_repeats=[1, 1, 1, 1],
    expand_ratios=[1, 2, 2, 2],
    depthwise_padding=[],
)
TINY_TEXT = dict(**TINY_WIDTH, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def tiny_config(**overrides) -> ClipQwenConfig:
    """A ClipQwenConfig of the real shape at toy size (about 10 M parameters, mostly the vocabulary)."""
    vision = overrides.pop("vision_config", {})
    if vision.get("model_type", "clip_vision_model") == "clip_vision_model":
        vision = {**TINY_VISION, **vision}
    text = {**TINY_TEXT, **overrides.pop("text_config", {})}
    return ClipQwenConfig(vision_config=vision, text_config=text, **overrides)


def bundled_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer shipped with the package (gzipped), unpacked once into the HF cache."""
    cache = clipqwen_cache_dir() / "qwen3-tokenizer"
    if not (cache / "tokenizer.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(BUNDLED_TOKENIZER / "tokenizer_config.json", cache / "tokenizer_config.json")
        partial = cache / f"tokenizer.json.{os.getpid()}.tmp"
        try:
            with gzip.open(BUNDLED_TOKENIZER / "tokenizer.json.gz", "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as error:  # a full disk, a size limit: the part written would only take space
            partial.unlink(missing_ok=True)
            if error.filename or error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(cache / "tokenizer.json")) from error  # write() names none
        partial.replace(cache / "tokenizer.json")  # atomic: parallel test workers never read half a file
    return cache


def bundled_processor(**kwargs) -> ClipQwenProcessor:
    """CLIP preprocessing + the bundled Qwen3 tokenizer; `kwargs` are ClipQwenProcessor's (`num_image_tokens`...)."""
    return ClipQwenProcessor(tower_image_processor(), AutoTokenizer.from_pretrained(bundled_tokenizer_dir()), **kwargs)
