"""ClipQwen configuration, shaped like transformers' `LlavaConfig`: one `@strict` composite config
of complete sub-configs, each field checked where it is set. The text sub-config may be any causal
LM's; the vision one a CLIP vision tower's, an EfficientNet's or a DINOv2's. Which parts train is the training
script's choice, not the config's.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils.type_validators import interval


# Qwen3-0.6B-Base's config.json. `Qwen3Config()`'s defaults are 8B-like, and transformers does not
# merge a partial `text_config` dict with them, so the full set is kept here.
QWEN3_0_6B_BASE = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151643,
)
# CLIP ViT-B/32 (openai/clip-vit-base-patch32) is `CLIPVisionConfig()` with this projection.
CLIP_VIT_B32 = dict(projection_dim=512)

# Image towers the projector knows how to read, by vision_config.model_type.
VISION_TOWERS = ("clip_vision_model", "efficientnet", "dinov2")

ProjectorType = Literal["linear", "mlp2x_gelu", "resampler"]
VisionFeatureType = Literal["pooled", "patch", "grid"]


@strict
class ClipQwenConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ClipQwenForConditionalGeneration`]. The defaults are the ClipCap layout:
    CLIP ViT-B/32's pooled, projected 512-d embedding → Linear-GELU-Linear → 8 image tokens for
    Qwen3-0.6B-Base. The project's first layout (the seed) is `projector_type="linear", num_pooled_image_tokens=1`.

    Args:
        vision_config (`dict`, `CLIPVisionConfig`, `EfficientNetConfig` or `Dinov2Config`, *optional*):
            The image tower. A dict names its `model_type` (default `"clip_vision_model"`, merged
            over CLIP ViT-B/32's values; or `"efficientnet"`, `"dinov2"`).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The decoder: any causal LM's config. A dict names its `model_type` (default `"qwen3"`,
            merged over Qwen3-0.6B-Base's values; another type takes its class defaults).
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"linear"` (one `nn.Linear`), `"mlp2x_gelu"` (Linear-GELU-Linear, as LLaVA-1.5) or
            `"resampler"`: `num_query_tokens` learned queries cross-attending over the tower's feature
            map (Qwen-VL's one-layer resampler; needs `vision_feature_type="patch"`).
        vision_feature_type (`str`, *optional*, defaults to `"pooled"`):
            `"pooled"`: one image embedding (CLIP's `image_embeds`, a CNN's pooled output, DINOv2's
            layernormed CLS token), expanded into `num_pooled_image_tokens` tokens (ClipCap). `"patch"`:
            one token per feature-map position (LLaVA): a ViT's CLS + patch states of
            `vision_feature_layer`, or a CNN's map. `"grid"`: the whole image's feature (a ViT's CLS state
            of `vision_feature_layer`, a CNN's mean) followed by the mean of each cell of a
            `vision_grid_size` × `vision_grid_size` grid over the map, each expanded as a pooled embedding:
            where things are, in a few tokens.
        num_pooled_image_tokens (`int`, *optional*, defaults to 8):
            Image tokens made from each pooled embedding: with `vision_feature_type="pooled"` the image's
            one, with `"grid"` the image's and each cell's.
        vision_grid_size (`int`, *optional*, defaults to 2):
            Cells per side of the grid with `vision_feature_type="grid"`, at most the map's side.
        num_query_tokens (`int`, *optional*, defaults to 8):
            Image tokens the resampler hands the decoder (BLIP-2's name). Only used with
            `projector_type="resampler"`.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            The ViT hidden state read with `vision_feature_type="patch"` (-2: the penultimate); DINOv2's
            through its final LayerNorm, as DINOv2 reads its features (-1: `last_hidden_state`). A CNN
            offers its final feature map only: -1.
        image_token_id (`int`, *optional*, defaults to 151655):
            The placeholder whose embeddings the projector output replaces (Qwen3's `<|image_pad|>`).
            For a tokenizer that lacked one, the id the processor added (`processor.image_token_id`).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Follows `text_config.tie_word_embeddings` (the decoder decides).
    """

    model_type = "clipqwen"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_B32),
        # as LLaVA: a dict's own `model_type` picks its class from CONFIG_MAPPING
        "text_config": SubConfigSpec(AutoConfig, model_type="qwen3", init_kwargs=QWEN3_0_6B_BASE),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: ProjectorType = "mlp2x_gelu"
    vision_feature_type: VisionFeatureType = "pooled"
    num_pooled_image_tokens: int = interval(min=1)(default=8)
    vision_grid_size: int = interval(min=1)(default=2)
    num_query_tokens: int = interval(min=1)(default=8)
    vision_feature_layer: int = -2
    image_token_id: int | None = 151655
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if "adapter_type" in kwargs:  # the field's first name, in configs saved before it was renamed
            self.projector_type = kwargs.pop("adapter_type")
        if isinstance(self.text_config, dict) and self.text_config.get("model_type", "qwen3") not in CONFIG_MAPPING:
            raise ValueError(
                f"text_config has model_type={self.text_config['model_type']!r}, which transformers "
                "does not know: use a causal LM's model_type (for example 'qwen3' or 'llama')."
            )
        if isinstance(self.vision_config, dict):
            self.vision_config = {"model_type": "clip_vision_model", **self.vision_config}
            vision_type = self.vision_config["model_type"]
            if vision_type not in VISION_TOWERS:
                raise ValueError(f"vision_config has model_type={vision_type!r}: use one of {VISION_TOWERS}.")
            # a partial CLIP dict is merged over the real checkpoint's values
            if vision_type == "clip_vision_model":
                self.vision_config = {**CLIP_VIT_B32, **self.vision_config}
        if isinstance(self.text_config, dict) and self.text_config.get("model_type", "qwen3") == "qwen3":
            self.text_config = {**QWEN3_0_6B_BASE, **self.text_config}
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = self.text_config.tie_word_embeddings

    # `@strict` class validators (run after __init__ and by `validate()` / `save_pretrained`): the
    # checks that need the sub-configs. Each message names the field and what is allowed.
    def validate_vision_feature_layer(self):
        if self.vision_config.model_type == "efficientnet":
            if self.vision_feature_type != "pooled" and self.vision_feature_layer != -1:
                raise ValueError(
                    f"vision_feature_layer={self.vision_feature_layer}: an EfficientNet offers its final "
                    "feature map only; use -1."
                )
            return
        layers = self.vision_config.num_hidden_layers
        if not -layers - 1 <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range: the tower has hidden "
                f"states -{layers + 1}..{layers}."
            )

    def validate_projector_type(self):
        if self.projector_type == "resampler" and self.vision_feature_type != "patch":
            raise ValueError(
                'projector_type="resampler" reads the image tower\'s feature map: set vision_feature_type="patch" '
                f"(it is {self.vision_feature_type!r})."
            )

    def validate_vision_grid_size(self):
        side = self.feature_map_side
        if self.vision_feature_type == "grid" and self.vision_grid_size > side:
            raise ValueError(
                f"vision_grid_size={self.vision_grid_size} is larger than the tower's {side}×{side} feature map: "
                f"use at most {side}."
            )

    def validate_image_token_id(self):
        vocab_size = self.text_config.vocab_size
        if self.image_token_id is not None and not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is out of range: use an id below the decoder's "
                f"vocab_size={vocab_size} (or None until the tokenizer gives it: `processor.image_token_id`)."
            )

    def validate_vision_config(self):
        if self.vision_config.model_type not in VISION_TOWERS:
            raise ValueError(
                f"vision_config is a {self.vision_config.model_type!r} config: use one of {VISION_TOWERS}."
            )
        if self.vision_config.model_type == "efficientnet":
            if self.vision_config.image_size % 32:
                raise ValueError(
                    f"vision_config.image_size={self.vision_config.image_size} is not a multiple of 32, "
                    "an EfficientNet's total stride."
                )
            return
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError(
                f"vision_config.image_size={self.vision_config.image_size} is not a multiple of "
                f"vision_config.patch_size={self.vision_config.patch_size}."
            )

    def to_dict(self):
        output = super().to_dict()
        # `register_for_auto_class` records one Auto class per model class (AutoModel); the
        # image-text-to-text entry (pipelines) names the same class, added here.
        auto_map = output.get("auto_map") or {}
        if "AutoModel" in auto_map:
            output["auto_map"] = {**auto_map, "AutoModelForImageTextToText": auto_map["AutoModel"]}
        return output

    @property
    def vision_feature_size(self) -> int:
        """Width of one image feature vector entering the projector."""
        vision = self.vision_config
        if vision.model_type == "efficientnet":
            return vision.hidden_dim  # the pooled output and the final map are both this wide
        if vision.model_type == "dinov2":
            return vision.hidden_size  # the pooled output is the CLS token: no projection
        return vision.projection_dim if self.vision_feature_type == "pooled" else vision.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """How many image placeholders one image takes in the text."""
        if self.projector_type == "resampler":
            return self.num_query_tokens
        if self.vision_feature_type == "pooled":
            return self.num_pooled_image_tokens
        if self.vision_feature_type == "grid":
            return (1 + self.vision_grid_size**2) * self.num_pooled_image_tokens
        return self.num_feature_positions

    @property
    def feature_map_side(self) -> int:
        """Positions per side of the tower's feature map (a CNN's total stride is 32)."""
        vision = self.vision_config
        return vision.image_size // (32 if vision.model_type == "efficientnet" else vision.patch_size)

    @property
    def num_feature_positions(self) -> int:
        """Feature vectors one image gives the projector with `vision_feature_type="patch"`."""
        cls = self.vision_config.model_type != "efficientnet"  # a ViT's CLS state comes first
        return self.feature_map_side**2 + cls


__all__ = ["ClipQwenConfig"]
