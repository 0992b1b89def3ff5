"""Ready-made configurations and the bundled tokenizer, for the offline demo, the tests and the benchmarks, and the
decoding a caption falls back on where a model's generation_config is silent.

The tiny preset mirrors the real structure at a size a CPU trains in minutes: CLIP with a 7×7 patch grid
plus CLS (like B/32's 224/32), Qwen3 with grouped-query attention (2 KV heads for 4 query heads), an
explicit head_dim and tied embeddings, and the real 151,936-row vocabulary so the real tokenizer fits.
"""

import copy
import gzip
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

# The three model files live at the repository root, which is also the shape of the Hub repository.
from configuration_clipqwen import ClipQwenConfig
from processing_clipqwen import ClipQwenProcessor


ASSETS = Path(__file__).parent / "assets"
BUNDLED_TOKENIZER = ASSETS / "qwen3-tokenizer"

# The layouts of a new captioner (`run_captioning.py --preset`). `clipcap` is the default: on real photos with a
# frozen real decoder it learned to caption from the image (Flickr8k, docs/flickr8k.md), because the pooled
# embedding becomes 8 tokens through an MLP and a word before them keeps them off the decoder's first position,
# which a pretrained decoder uses as an attention sink. `seed_exact` is the course project's layout (one token
# through a Linear, first): in the same experiment it never used the image.
DEFAULT_PRESET = "clipcap"
LAYOUTS = {
    "clipcap": dict(
        adapter_type="mlp2x_gelu",
        vision_feature_type="pooled",
        num_pooled_image_tokens=8,
        prompt="Image:<|image_pad|>",
    ),
    "seed_exact": dict(adapter_type="linear", vision_feature_type="pooled", num_pooled_image_tokens=1, prompt=""),
}


# How a caption is decoded where the model's generation_config says nothing. run_captioning writes its --num_beams /
# --max_new_tokens and min_new_tokens into every exported generation_config.json, so this applies only to folders saved
# another way (a Trainer checkpoint, a model built in code): without it transformers stops at a length of its own
# (20 tokens, with a warning) and an untrained model whose first greedy token is end-of-text gives an empty caption.
CAPTION_GENERATION = {"max_new_tokens": 30, "min_new_tokens": 1, "num_beams": 1}


def caption_generation_config(generation_config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """The decoding of a caption: a copy of the model's `generation_config` (the single source, which the caption CLI
    and the demo read), with CAPTION_GENERATION for what it leaves unset (a length it caps with `max_length` /
    `min_length` counts as set), then every override that is not None (a flag or a control the user set)."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    counts_as = {"max_new_tokens": "max_length", "min_new_tokens": "min_length"}
    unset = {
        name: value
        for name, value in CAPTION_GENERATION.items()
        if getattr(config, name) is None and getattr(config, counts_as.get(name, name)) is None
    }
    unknown = config.update(**(unset | {name: value for name, value in overrides.items() if value is not None}))
    if unknown:
        raise TypeError(f"Not generation settings: {', '.join(unknown)}")
    return config


def layout_config(preset: str) -> dict:
    """A layout's ClipQwenConfig fields: LAYOUTS[preset] without its prompt, which the processor holds."""
    return {name: value for name, value in LAYOUTS[preset].items() if name != "prompt"}


TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    projection_dim=32,
)
# EfficientNet at toy size: stem stride 2 and four stride-2 stages (total stride 32, as the real one), 128-wide final
# map (width_coefficient 0.1 scales every stage and the 1280-wide head together).
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
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def tiny_config(**overrides) -> ClipQwenConfig:
    """A ClipQwenConfig of the real shape at toy size (about 10 M parameters, mostly the vocabulary)."""
    vision = overrides.pop("vision_config", {})
    if vision.get("model_type", "clip_vision_model") == "clip_vision_model":
        vision = {**TINY_VISION, **vision}
    text = {**TINY_TEXT, **overrides.pop("text_config", {})}
    return ClipQwenConfig(vision_config=vision, text_config=text, **overrides)


def clipqwen_cache_dir() -> Path:
    """$HF_HOME/clipqwen, resolved the way huggingface_hub resolves HF_HOME (XDG_CACHE_HOME included)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "clipqwen"


def bundled_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer shipped with the package (gzipped), unpacked once into the HF cache."""
    cache = clipqwen_cache_dir() / "qwen3-tokenizer"
    if not (cache / "tokenizer.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(BUNDLED_TOKENIZER / "tokenizer_config.json", cache / "tokenizer_config.json")
        partial = cache / f"tokenizer.json.{os.getpid()}.tmp"
        with gzip.open(BUNDLED_TOKENIZER / "tokenizer.json.gz", "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(cache / "tokenizer.json")  # atomic: parallel test workers never read half a file
    return cache


def clip_image_processor(name_or_path: str | None = None, **kwargs):
    """CLIP ViT-B/32 preprocessing (shortest edge 224, bicubic, centre crop 224, OpenAI mean/std), or the one
    saved with a CLIP checkpoint. The torchvision-free class is used where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import CLIPImageProcessorPil as image_processor_class
    else:
        from transformers import CLIPImageProcessor as image_processor_class
    if name_or_path is not None:
        return image_processor_class.from_pretrained(name_or_path, **kwargs)
    return image_processor_class(**kwargs)


def bundled_processor(**kwargs) -> ClipQwenProcessor:
    """CLIP preprocessing + the bundled Qwen3 tokenizer; `kwargs` are ClipQwenProcessor's (`num_image_tokens`...)."""
    return ClipQwenProcessor(clip_image_processor(), AutoTokenizer.from_pretrained(bundled_tokenizer_dir()), **kwargs)
