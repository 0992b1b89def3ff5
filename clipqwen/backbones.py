"""Assemble a ClipQwen model from two pretrained checkpoints, and match it to its processor's tokens."""

import os
import pickle
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from configuration_clipqwen import ClipQwenConfig
from modeling_clipqwen import ClipQwenForConditionalGeneration, ClipQwenMultiModalProjector, vision_model_class


logger = logging.get_logger(__name__)


@contextmanager
def _safetensors_conversion_disabled():
    previous = os.environ.get("DISABLE_SAFETENSORS_CONVERSION")
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_SAFETENSORS_CONVERSION", None)
        else:
            os.environ["DISABLE_SAFETENSORS_CONVERSION"] = previous


def load_backbone_weights(model_class, name_or_path: str, **options):
    """`model_class.from_pretrained` from safetensors when the checkpoint has them, else from its `.bin` through
    torch's `weights_only` unpickler (tensors and plain containers only; any other pickle is refused before it runs):
    openai/clip-vit-base-patch32's `main` holds only `pytorch_model.bin`. transformers' safetensors converter bot
    (which would open a conversion pull request on the Hub and load from it) is off for both. With `gguf_file=` the
    weights come from that GGUF file, dequantized to `dtype`."""
    with _safetensors_conversion_disabled():
        if options.get("gguf_file"):
            return model_class.from_pretrained(name_or_path, **options)
        try:
            return model_class.from_pretrained(name_or_path, use_safetensors=True, **options)
        except OSError as error:
            if "safetensors" not in str(error):
                raise
        logger.warning(
            "%s has no safetensors weights at this revision: loading its .bin with torch's weights_only "
            "unpickler (tensors only).",
            name_or_path,
        )
        try:
            return model_class.from_pretrained(name_or_path, use_safetensors=False, weights_only=True, **options)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{name_or_path}: its .bin weights hold objects other than tensors and were refused without running "
                f"them ({str(error).splitlines()[0]}). Use a checkpoint with safetensors weights."
            ) from error


def _merge_options(backbone: str, named: dict, extra: dict | None) -> dict:
    """One backbone's `from_pretrained` options: the named arguments, then its `*_kwargs`; a key given both ways
    with two different values is an error rather than a silent choice."""
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
    """A ClipQwen model from an image-tower checkpoint (CLIP, or an EfficientNet) and a causal-LM checkpoint (Hub ids
    or folders, each at its revision); the projector starts from its initialisation. `config_kwargs` are
    `ClipQwenConfig` fields (`adapter_type="mlp2x_gelu"`, `vision_feature_type="patch"`, ...). Without `dtype` each
    backbone keeps its checkpoint's dtype (Qwen3-0.6B-Base bf16, CLIP fp32) and the projector is fp32.
    `vision_kwargs` / `text_kwargs` are further `from_pretrained` options for one backbone (`gguf_file=`, ...).
    Nothing is frozen here: that is the training script's choice (`clipqwen.freezing.freeze_backbones`).

    Only a Qwen3 decoder's placeholder id is known here (151655, `<|image_pad|>`); any other decoder starts with
    `image_token_id=None`: build the `ClipQwenProcessor` from its tokenizer and call `match_processor`."""
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
    # the loaded sub-configs themselves, so that model.config.text_config *is* the decoder's config (resizing the
    # vocabulary, the attention implementation), as in a model built from a config
    config = ClipQwenConfig(vision_config=vision.config, text_config=text.config, **config_kwargs)
    with torch.device("meta"):
        model = ClipQwenForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = text.get_decoder()
    model.lm_head = text.get_output_embeddings()
    # a new layer, so no checkpoint dtype to keep: fp32 (what its optimizer needs) unless `dtype` names one
    projector = ClipQwenMultiModalProjector(config)
    if dtype not in (None, "auto"):
        projector.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    projector.apply(model._init_weights)
    model.model.multi_modal_projector = projector
    return model


def match_processor(model: ClipQwenForConditionalGeneration, processor) -> ClipQwenForConditionalGeneration:
    """Make the model read and write exactly the processor's tokens:

    - the embeddings grow to the tokenizer's length when the processor added an image placeholder (Llama's and
      SmolLM2's tokenizers have none); the new row is never trained (the projector output replaces it);
    - `config.image_token_id` becomes the processor's placeholder id, and generation suppresses it;
    - generation ends captions on the processor's caption end token (what the labels supervise) and pads with the
      tokenizer's pad token.

    A no-op for the bundled Qwen3 tokenizer and a Qwen3 decoder. Returns the model."""
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
