"""Ready-made layouts, tiny configs and the bundled tokenizer (offline demo, tests, benchmarks), and
the decoding a caption falls back on where a model's generation_config is silent.

The tiny configs mirror the real structure at a size a CPU trains in minutes: 7×7 patches plus CLS,
GQA (2 KV heads for 4 query heads), an explicit head_dim, tied embeddings, the real vocabulary.
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

# Layouts of a new captioner (`--preset`). `clipcap`, the default, learned from the image with a
# frozen decoder (docs/flickr8k.md): a word before its 8 tokens keeps them off the attention-sink
# first position. `seed_exact` (one token through a Linear, first) is the course's; it did not.
DEFAULT_PRESET = "clipcap"
LAYOUTS = {
    "clipcap": dict(
        adapter_type="mlp2x_gelu",
        vision_feature_type="pooled",
        num_pooled_image_tokens=8,
        prompt="Image:<|image_pad|>",
    ),
    # learned queries read the tower's feature map (Qwen-VL's resampler): as few tokens as clipcap
    "resampler": dict(
        adapter_type="resampler",
        vision_feature_type="patch",
        num_pooled_image_tokens=8,
        prompt="Image:<|image_pad|>",
    ),
    "seed_exact": dict(adapter_type="linear", vision_feature_type="pooled", num_pooled_image_tokens=1, prompt=""),
}


# Decoding where a model's generation_config says nothing (folders not exported by run_captioning):
# else transformers stops at its own length, and an untrained model may give an empty caption.
CAPTION_GENERATION = {"max_new_tokens": 30, "min_new_tokens": 1, "num_beams": 1}


def caption_generation_config(generation_config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """A copy of the model's `generation_config` (the one source of decoding), CAPTION_GENERATION
    where it is silent (`max_length` / `min_length` count as set), then each override not None."""
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
