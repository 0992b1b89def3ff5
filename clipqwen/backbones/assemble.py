"""Assemble a ClipQwen model from two pretrained checkpoints, and match it to its processor's tokens."""

import os
import pickle
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from configuration_clipqwen import ClipQwenConfig
from modeling_clipqwen import ClipQwenForConditionalGeneration, multi_modal_projector, vision_model_class


logger = logging.get_logger(__name__)


# from_pretrained's Hub options; the rest of a backbone's options go to the loader
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def _weights_folder(name_or_path: str, subfolder: str = "", **hub_options) -> str:
    """A local folder for `name_or_path`: itself, or a snapshot of the Hub repository's JSON files and weights
    (in `subfolder` where given) at its revision: safetensors, else the .bin. transformers, given a Hub id whose
    revision has only a .bin, asks the safetensors converter bot for its pull request and loads that, or has it
    open one; from a folder it does neither. Anything else (a mistyped path) is left to transformers' own error."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return name_or_path
    weights = f"{subfolder}/" if subfolder else ""
    folder = snapshot_download(name_or_path, allow_patterns=["*.json", f"{weights}model*.safetensors"], **hub_options)
    if not any((Path(folder) / subfolder).glob("model*.safetensors")):
        folder = snapshot_download(
            name_or_path, allow_patterns=["*.json", f"{weights}pytorch_model*.bin"], **hub_options
        )
    return folder


def load_backbone_weights(model_class, name_or_path: str, **options):
    """`model_class.from_pretrained` from safetensors where the checkpoint has them, else from its
    `.bin` through torch's `weights_only` unpickler (CLIP B/32's `main` has only a .bin), read from a local
    folder (`_weights_folder`) so that the converter bot is never asked. With `gguf_file=`, from that file,
    dequantized. The model's `name_or_path` is `name_or_path`, the Hub id a model card names."""
    if options.get("gguf_file"):
        return model_class.from_pretrained(name_or_path, **options)
    hub_options = {key: options.pop(key) for key in HUB_OPTIONS if key in options}
    folder = _weights_folder(name_or_path, options.get("subfolder", ""), **hub_options)
    try:
        model = model_class.from_pretrained(folder, use_safetensors=True, **options)
    except OSError as error:
        if "safetensors" not in str(error):
            raise
        logger.warning(
            "%s has no safetensors weights at this revision: loading its .bin with torch's weights_only "
            "unpickler (tensors only).",
            name_or_path,
        )
        try:
            model = model_class.from_pretrained(folder, use_safetensors=False, weights_only=True, **options)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{name_or_path}: its .bin weights hold objects other than tensors and were refused without running "
                f"them ({str(error).splitlines()[0]}). Use a checkpoint with safetensors weights."
            ) from error
    model.config._name_or_path = name_or_path
    return model


def _merge_options(backbone: str, named: dict, extra: dict | None) -> dict:
    """One backbone's `from_pretrained` options: the named arguments, then its `*_kwargs`; a key
    given both ways with two values is an error rather than a silent choice."""
    options = {key: value for key, value in named.items() if value is not None}
    for key, value in (extra or {}).items():
        if key in options and options[key] != value:
            raise ValueError(
                f"{backbone} backbone option {key!r} is given twice ({options[key]!r} and {value!r} in "
                f"{backbone}_kwargs): pass it once."
            )
        options[key] = value
    return options


def from_pretrained_backbones(
    vision_model_name_or_path: str = "openai/clip-vit-base-patch32",
    text_model_name_or_path: str = "Qwen/Qwen3-0.6B-Base",
    dtype: torch.dtype | str | None = None,
    vision_revision: str | None = None,
    text_revision: str | None = None,
    cache_dir: str | None = None,
    vision_kwargs: dict | None = None,
    text_kwargs: dict | None = None,
    **config_kwargs,
) -> ClipQwenForConditionalGeneration:
    """A ClipQwen model from an image-tower checkpoint (CLIP, or an EfficientNet) and a causal LM
    (Hub ids or folders, each at its revision) with a new projector; nothing is frozen here.
    `config_kwargs` are ClipQwenConfig fields; `vision_kwargs` / `text_kwargs` are `from_pretrained`
    options of one backbone (`gguf_file=`, ...). Without `dtype` each keeps its checkpoint's dtype.
    Only Qwen3's image placeholder id is known here: for another decoder, call `match_processor`."""
    shared = {"dtype": dtype, "cache_dir": cache_dir}
    vision_options = _merge_options("vision", {**shared, "revision": vision_revision}, vision_kwargs)
    text_options = _merge_options("text", {**shared, "revision": text_revision}, text_kwargs)
    vision_config = AutoConfig.from_pretrained(
        vision_model_name_or_path,
        **{key: value for key, value in vision_options.items() if key in ("revision", "cache_dir", "token")},
    )
    vision = load_backbone_weights(vision_model_class(vision_config), vision_model_name_or_path, **vision_options)
    try:
        text = load_backbone_weights(AutoModelForCausalLM, text_model_name_or_path, **text_options)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ValueError(
            f"{text_model_name_or_path!r} is not a causal language model that AutoModelForCausalLM can load; "
            "ClipQwen needs a decoder-only LM (for example Qwen/Qwen3-0.6B-Base)."
        ) from error
    # a GGUF checkpoint is dequantized on load: the saved model must not claim a quantization it does not have
    if getattr(text.config, "quantization_config", None) and getattr(text, "hf_quantizer", None) is None:
        del text.config.quantization_config
    if text.config.model_type != "qwen3":
        config_kwargs.setdefault("image_token_id", None)
    # the loaded sub-configs: model.config.text_config *is* the decoder's (resizing, attention)
    config = ClipQwenConfig(vision_config=vision.config, text_config=text.config, **config_kwargs)
    with torch.device("meta"):
        model = ClipQwenForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = text.get_decoder()
    model.lm_head = text.get_output_embeddings()
    # a new layer, so no checkpoint dtype to keep: fp32 (what its optimizer needs) unless `dtype` names one
    projector = multi_modal_projector(config)
    if dtype not in (None, "auto"):
        projector.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    projector.apply(model._init_weights)
    model.model.multi_modal_projector = projector
    return model


def match_processor(model: ClipQwenForConditionalGeneration, processor) -> ClipQwenForConditionalGeneration:
    """Make the model read and write exactly the processor's tokens: embeddings grown for an added
    placeholder (never trained), its id as `config.image_token_id` (suppressed in generation), and
    the caption end and pad tokens. A no-op for Qwen3 and its tokenizer. Returns the model."""
    if processor.num_image_tokens != model.config.num_image_tokens:
        raise ValueError(
            f"The processor writes {processor.num_image_tokens} image placeholders but the model "
            f"expects {model.config.num_image_tokens}; set the processor's num_image_tokens to match."
        )
    tokenizer = processor.tokenizer
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    previous = model.config.image_token_id
    model.config.image_token_id = processor.image_token_id
    model.config.validate()
    generation = model.generation_config
    suppressed = set(generation.suppress_tokens or []) - {previous} | {processor.image_token_id}
    generation.suppress_tokens = sorted(suppressed)
    generation.eos_token_id = processor.caption_end_token_id
    pad = tokenizer.pad_token_id
    generation.pad_token_id = pad if pad is not None else processor.caption_end_token_id
    return model


# CLIP's preprocessing at 224 px: shortest edge 224 (bicubic), centre crop 224, pixels / 255, normalised, RGB. The
# converted towers keep it and differ only in mean and std, written out in full in their saved processor configs.
CLIP_RECIPE_224 = dict(
    do_resize=True,
    size={"shortest_edge": 224},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
)


def tower_image_processor(name_or_path: str | None = None, **kwargs):
    """An image processor of CLIP's recipe (shortest-edge resize, centre crop, normalise): CLIP ViT-B/32's by
    default (224, bicubic, OpenAI mean/std), or the one saved with a tower checkpoint (CLIP's, or EfficientNet-Lite0's
    with its own normalisation). The torchvision-free class is used where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import CLIPImageProcessorPil as image_processor_class
    else:
        from transformers import CLIPImageProcessor as image_processor_class
    if name_or_path is not None:
        return image_processor_class.from_pretrained(name_or_path, **kwargs)
    return image_processor_class(**kwargs)
