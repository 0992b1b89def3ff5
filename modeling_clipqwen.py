"""ClipQwen: image features (CLIP by default) → trainable adapter → causal-LM decoder (Qwen3 by default), as one
transformers model.

Where the ideas come from:
- LLaVA (Liu et al. 2023) and transformers' `modeling_llava.py`: image features replace placeholder-token
  embeddings (`masked_scatter`), so `generate()` — KV cache, beam search, static cache — works unchanged;
  the `mlp2x_gelu` projector is LLaVA-1.5's.
- ClipCap (Mokady et al. 2021): one pooled CLIP embedding expanded into K prefix tokens.
- The course project this replaces: a frozen pooled CLIP-B/32 embedding → `nn.Linear(512, 1024)` → Qwen3.
- The decoder is built from `config.text_config` through `AutoModelForCausalLM` and reached only through its
  public accessors (`get_decoder()`, `get_input_embeddings()`, `get_output_embeddings()`), as LLaVA builds its
  language model through the Auto classes: any causal LM of transformers can sit behind the adapter. The image
  tower is built from `config.vision_config` the same way (CLIP keeps its projection head, for its image embedding)
  and reached through `get_encoder(modality="image")`.
- Which parts train is the training script's choice (`clipqwen.freezing.freeze_backbones`), not the model's.
"""

import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionModelWithProjection,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, MultimodalCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple


try:
    from .configuration_clipqwen import ClipQwenConfig
except ImportError:  # the repository root used as a plain module path (tests, scripts)
    from configuration_clipqwen import ClipQwenConfig

logger = logging.getLogger(__name__)


@dataclass
class ClipQwenCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    transformers' multimodal causal-LM output, with two differences that are this model's extensions:

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Cross-entropy over the supervised tokens (caption + one end-of-text), summed and divided by their
        count (or by `num_items_in_batch`, which Trainer passes so that gradient accumulation is exact).
    logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`, *optional*):
        Next-token scores. `None` when `labels` is given: the loss applies the LM head only at the supervised
        positions; otherwise for the last `logits_to_keep` positions (0 = all).
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The CLIP tower's outputs, with the adapter output as `pooler_output` (see `get_image_features`).
    """

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The adapter output placed at the image placeholders: (batch_size, num_image_tokens, hidden_size)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


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
    """`model_class.from_pretrained` from safetensors when the checkpoint has them, else from its PyTorch `.bin`
    through torch's `weights_only` unpickler, which builds only tensors and plain containers and refuses any
    other pickle before running it. openai/clip-vit-base-patch32 needs the second: its `main` branch holds only
    `pytorch_model.bin`. transformers' safetensors converter bot (which looks up, or opens, a conversion pull
    request on the Hub and would load the weights from that pull request) is switched off for both attempts.
    With `gguf_file=` the weights come from that GGUF file (tensors only, no pickle), dequantized to `dtype`."""
    with _safetensors_conversion_disabled():
        if options.get("gguf_file"):
            return model_class.from_pretrained(name_or_path, **options)
        try:
            return model_class.from_pretrained(name_or_path, use_safetensors=True, **options)
        except OSError as error:
            if "safetensors" not in str(error):
                raise
        logger.warning("%s has no safetensors weights at this revision: loading its .bin with torch's weights_only "
                       "unpickler (tensors only).", name_or_path)
        try:
            return model_class.from_pretrained(name_or_path, use_safetensors=False, weights_only=True, **options)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{name_or_path}: its .bin weights hold objects other than tensors and were refused without running "
                f"them ({str(error).splitlines()[0]}). Use a checkpoint with safetensors weights."
            ) from error


def _merge_options(backbone: str, named: dict, extra: dict | None) -> dict:
    """One backbone's `from_pretrained` options: the named arguments, then its `*_kwargs` dict; a key given both
    ways with two different values is an error rather than a silent choice."""
    options = {key: value for key, value in named.items() if value is not None}
    for key, value in (extra or {}).items():
        if key in options and options[key] != value:
            raise ValueError(f"{backbone} backbone option {key!r} is given twice ({options[key]!r} and {value!r} in "
                             f"{backbone}_kwargs): pass it once.")
        options[key] = value
    return options


def vision_model_class(vision_config):
    """The class of the image tower: CLIP with its projection head (the pooled feature is its image embedding, and
    the key layout every ClipQwen checkpoint was saved with), any other tower the class `AutoModel` would build."""
    if vision_config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModelWithProjection
    return MODEL_MAPPING[type(vision_config)]


class ClipQwenAdapter(nn.Module):
    """Maps image features (batch, n, feature_size) to decoder embeddings (batch, num_image_tokens, hidden)."""

    def __init__(self, config: ClipQwenConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        # A pooled embedding (n = 1) is expanded into K tokens by the last layer's width (ClipCap);
        # patch features (n = 50 for CLIP-B/32, 49 for a 7×7 CNN map) map one to one.
        tokens_per_feature = config.num_pooled_image_tokens if config.vision_feature_type == "pooled" else 1
        self.hidden_size = hidden
        if config.adapter_type == "linear":
            self.layers = nn.Sequential(nn.Linear(config.vision_feature_size, hidden * tokens_per_feature))
        else:  # mlp2x_gelu
            self.layers = nn.Sequential(
                nn.Linear(config.vision_feature_size, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden * tokens_per_feature),
            )

    def forward(self, vision_embeds: torch.Tensor) -> torch.Tensor:
        projected = self.layers(vision_embeds)
        return projected.reshape(projected.shape[0], -1, self.hidden_size)


class ClipQwenPreTrainedModel(PreTrainedModel):
    config_class = ClipQwenConfig
    config: ClipQwenConfig
    # LLaVA's name for its base model. ClipQwen keeps its three parts (vision_model, adapter, language_model) on the
    # head class itself — the key layout of every saved checkpoint — so there is no separate base model to strip
    # or prepend when loading, and `base_model` is the model.
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The decoder's own `_no_split_modules` (Qwen3DecoderLayer, LlamaDecoderLayer, ...) are added by post_init.
    _no_split_modules = ["CLIPEncoderLayer", "EfficientNetBlock"]
    _skip_keys_device_placement = "cache"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # The sub-models initialise their own modules; the adapter's nn.Linear layers get the base `_init_weights`:
    # normal(std=text_config.initializer_range), zero bias — image tokens start at the norm of the decoder's word
    # embeddings, where PyTorch's Kaiming-uniform default would put them far above it.

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen image tower computes as in inference even while the rest trains: a CNN's BatchNorm would otherwise
        # normalise with batch statistics and overwrite its pretrained running statistics.
        tower = self.get_encoder(modality="image")
        if mode and not any(parameter.requires_grad for parameter in tower.parameters()):
            tower.eval()
        return self


class ClipQwenForConditionalGeneration(ClipQwenPreTrainedModel, GenerationMixin):
    """CLIP vision tower + adapter + causal LM (Qwen3 by default). Use `generate()` for captions.

    Two extensions to LLaVA's interface: `vision_embeds` (precomputed CLIP features from `get_vision_embeds`, e.g.
    a feature cache) may replace `pixel_values`, and with `labels` the LM head runs only at supervised positions
    (the loss is returned, the logits are not)."""

    def __init__(self, config: ClipQwenConfig):
        super().__init__(config)
        self.vision_model = vision_model_class(config.vision_config)._from_config(config.vision_config)
        self.adapter = ClipQwenAdapter(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        if self.generation_config.pad_token_id is None:  # Qwen3-Base pads with its EOS, <|endoftext|>
            self.generation_config.pad_token_id = config.text_config.eos_token_id
        # A generated placeholder would be an image position without an image (and, without a KV cache, a
        # placeholder-count error on the next step): it is never a caption token.
        self.generation_config.suppress_tokens = [] if config.image_token_id is None else [config.image_token_id]

    @classmethod
    def from_pretrained_backbones(
        cls,
        vision_model_name_or_path: str = "openai/clip-vit-base-patch32",
        text_model_name_or_path: str = "Qwen/Qwen3-0.6B-Base",
        dtype: torch.dtype | str | None = None,
        vision_revision: str | None = None,
        text_revision: str | None = None,
        cache_dir: str | None = None,
        vision_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "ClipQwenForConditionalGeneration":
        """Assemble a ClipQwen model from an image-tower checkpoint (CLIP, or an EfficientNet) and a causal-LM
        checkpoint (Hub ids or local folders,
        each at its revision); the adapter starts from its initialisation. `config_kwargs` are `ClipQwenConfig`
        fields, for example `adapter_type="mlp2x_gelu"` or `vision_feature_type="patch"`. Weights load as
        `load_backbone_weights` says. Without `dtype`, each backbone keeps its checkpoint's dtype (transformers'
        `"auto"`: Qwen/Qwen3-0.6B-Base is bf16, openai/clip-vit-base-patch32 fp32) and the new adapter is fp32;
        `dtype=torch.float32` (or `"bfloat16"`, ...) sets all three.

        Nothing is frozen here: a training script chooses that (`clipqwen.freezing.freeze_backbones`).

        `vision_kwargs` / `text_kwargs` are further `from_pretrained` options for one backbone, for example
        `text_kwargs={"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}` or a per-backbone `dtype`.

        Only a Qwen3 decoder's placeholder id is known here (151655, `<|image_pad|>`). Any other decoder starts
        with `image_token_id=None` (unless given): build the `ClipQwenProcessor` from its tokenizer (it adds a
        placeholder token where there is none) and call `model.match_processor(processor)`."""
        shared = {"dtype": dtype, "cache_dir": cache_dir}
        vision_options = _merge_options("vision", {**shared, "revision": vision_revision}, vision_kwargs)
        text_options = _merge_options("text", {**shared, "revision": text_revision}, text_kwargs)
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path, **{
            key: value for key, value in vision_options.items() if key in ("revision", "cache_dir", "token")})
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
        # A GGUF checkpoint is dequantized on load: the model in memory holds plain tensors, and a saved ClipQwen
        # must not claim a quantization it does not have.
        if getattr(text.config, "quantization_config", None) and getattr(text, "hf_quantizer", None) is None:
            del text.config.quantization_config
        if text.config.model_type != "qwen3":
            config_kwargs.setdefault("image_token_id", None)
        # The loaded sub-configs themselves, so that model.config.text_config *is* language_model.config (resizing
        # the vocabulary, attention implementation) as in a model built from a config.
        config = ClipQwenConfig(vision_config=vision.config, text_config=text.config, **config_kwargs)
        with torch.device("meta"):
            model = cls(config)
        model.vision_model, model.language_model = vision, text
        # A new layer, so no checkpoint dtype to keep: fp32, the dtype its optimizer needs, unless `dtype` names one.
        model.adapter = ClipQwenAdapter(config)
        if dtype not in (None, "auto"):
            model.adapter.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.adapter.apply(model._init_weights)
        return model

    def match_processor(self, processor) -> "ClipQwenForConditionalGeneration":
        """Make the model read and write exactly the processor's tokens:

        - the embedding matrix grows to the tokenizer's length when the processor added an image placeholder
          token (a decoder such as Llama or SmolLM2 has none). The new row is never trained — the adapter output
          always replaces it — and `freeze_backbones` freezes it with the rest of the decoder;
        - `config.image_token_id` becomes the processor's placeholder id, and generation suppresses it;
        - generation ends captions on the processor's caption end token (what the labels supervise; an instruct
          model's own EOS may differ) and pads with the tokenizer's pad token.

        A no-op for the bundled Qwen3 tokenizer and a Qwen3 decoder. Returns the model."""
        if processor.num_image_tokens != self.config.num_image_tokens:
            raise ValueError(f"The processor writes {processor.num_image_tokens} image placeholders but the model "
                             f"expects {self.config.num_image_tokens}; set the processor's num_image_tokens to match.")
        tokenizer = processor.tokenizer
        if len(tokenizer) > self.get_input_embeddings().num_embeddings:
            self.resize_token_embeddings(len(tokenizer))
        previous = self.config.image_token_id
        self.config.image_token_id = processor.image_token_id
        self.config.validate()
        generation = self.generation_config
        suppressed = set(generation.suppress_tokens or []) - {previous} | {processor.image_token_id}
        generation.suppress_tokens = sorted(suppressed)
        generation.eos_token_id = processor.caption_end_token_id
        pad = tokenizer.pad_token_id
        generation.pad_token_id = pad if pad is not None else processor.caption_end_token_id
        return self

    # ---- embeddings (used by generate, peft and resize_token_embeddings) -------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    # ---- image features ------------------------------------------------------------------------------
    def _vision_tower(self, pixel_values: torch.FloatTensor, **kwargs):
        """The tower's outputs and the features the adapter reads: (batch, feature_size) pooled embeddings (CLIP's
        projected `image_embeds`, another tower's `pooler_output`), or (batch, positions, feature_size) patch
        features (CLIP's hidden states of `vision_feature_layer`, a CNN's final map flattened)."""
        tower = self.get_encoder(modality="image")
        pixel_values = pixel_values.to(tower.dtype)
        is_cnn = self.config.vision_config.model_type == "efficientnet"
        if self.config.vision_feature_type == "pooled" or is_cnn:
            outputs = tower(pixel_values=pixel_values, return_dict=True, **kwargs)
            if self.config.vision_feature_type == "pooled":
                return outputs, outputs.image_embeds if "image_embeds" in outputs else outputs.pooler_output
            return outputs, outputs.last_hidden_state.flatten(2).transpose(1, 2)  # (b, c, h, w) → (b, h·w, c)
        requested = kwargs.pop("output_hidden_states", None)
        if requested is None:
            requested = tower.config.output_hidden_states
        outputs = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        embeds = outputs.hidden_states[self.config.vision_feature_layer]
        if not requested:  # read for the features, not asked for by the caller
            outputs.hidden_states = None
        return outputs, embeds

    def get_vision_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """The frozen image tower alone: (batch, feature_size) pooled embeddings or (batch, positions, feature_size)
        patch features. This is what a feature cache stores (this model's extension)."""
        return self._vision_tower(pixel_values)[1]

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_embeds: torch.Tensor | None = None, **kwargs
    ) -> tuple | BaseModelOutputWithPooling:
        """CLIP's outputs (`last_hidden_state`, `hidden_states`, `attentions` as requested) with the adapter output
        as `pooler_output`: (batch, num_image_tokens, text hidden size), one 2-D entry per image. From
        `vision_embeds` (precomputed `get_vision_embeds`) only `pooler_output` is set."""
        if vision_embeds is None:
            outputs, vision_embeds = self._vision_tower(pixel_values, **kwargs)
        else:
            outputs = BaseModelOutputWithPooling()
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.adapter(vision_embeds.to(self.adapter.layers[0].weight.dtype)),
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),  # a CNN has none
        )

    def merge_image_features(self, input_ids, inputs_embeds, image_features):
        """Write the image features into the placeholder positions of `inputs_embeds`."""
        placeholder_mask = input_ids == self.config.image_token_id
        found, expected = placeholder_mask.sum(), image_features.shape[0] * image_features.shape[1]
        torch_compilable_check(
            found == expected,
            lambda: f"The text has {int(found)} image placeholder tokens (id {self.config.image_token_id}) but the "
            f"images give {expected} feature vectors ({image_features.shape[0]} images × {image_features.shape[1]} "
            "tokens). Build inputs with ClipQwenProcessor, whose num_image_tokens must equal the model config's "
            "num_image_tokens.",
        )
        mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    # ---- forward -------------------------------------------------------------------------------------
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | ClipQwenCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            Token ids with `num_image_tokens` placeholders (`config.image_token_id`) per image (see ClipQwenProcessor).
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, 224, 224)`, *optional*):
            CLIP-normalised images.
        vision_embeds (`torch.FloatTensor`, *optional*):
            Precomputed output of `get_vision_embeds` (a feature cache), used instead of `pixel_values`.
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
            Target ids, -100 where nothing is supervised; shifted inside, as in every causal LM.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if pixel_values is not None and vision_embeds is not None:
            raise ValueError("Pass pixel_values or vision_embeds, not both.")
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set: this decoder's placeholder id comes from its "
                             "tokenizer. Build a ClipQwenProcessor from that tokenizer and call "
                             "model.match_processor(processor).")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)

        image_outputs = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None or vision_embeds is not None:
                image_outputs = self.get_image_features(pixel_values, vision_embeds, return_dict=True, **kwargs)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_outputs.pooler_output)

        outputs = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        lm_head = self.get_output_embeddings()

        loss = logits = None
        if labels is not None:
            # The LM head (hidden × 151,936 for Qwen3) is a quarter of a token's forward cost: apply it only where a
            # target exists (caption tokens and the closing end-of-text), not at image/prompt/pad positions.
            shift_labels = labels[:, 1:].to(hidden_states.device)
            supervised = shift_labels != -100
            selected_logits = lm_head(hidden_states[:, :-1][supervised]).float()
            loss = nn.functional.cross_entropy(selected_logits, shift_labels[supervised], reduction="sum")
            denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum()
            loss = loss / torch.as_tensor(denominator, device=loss.device).clamp(min=1)
        else:
            logits = lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        return ClipQwenCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        # Image features enter once, at prefill; later steps read them from the KV cache. (generate already
        # drops pixel_values after prefill; vision_embeds is ours, so we drop it here.)
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("vision_embeds", None)
        return model_inputs


# Registered at import time so that every save_pretrained — Trainer checkpoints included — writes the .py files
# and the auto_map that `trust_remote_code=True` loading needs. `register_for_auto_class` records one Auto class
# per model; the image-text-to-text entry goes beside it in the config's auto_map, which `save_pretrained` writes.
ClipQwenConfig.register_for_auto_class()
ClipQwenForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["ClipQwenAdapter", "ClipQwenForConditionalGeneration", "ClipQwenPreTrainedModel"]
