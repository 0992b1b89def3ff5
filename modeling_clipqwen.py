"""ClipQwen: an image tower (CLIP ViT-B/32 by default) → a small projector → a causal LM (Qwen3 by
default), in the shape of transformers' LLaVA: `ClipQwenModel` (vision tower, projector, decoder
body) and `ClipQwenForConditionalGeneration` (`model`, `lm_head`).

- Image features replace the placeholders' embeddings (`masked_scatter`): `generate()` is the stock one.
- A pooled image embedding becomes `num_pooled_image_tokens` tokens (ClipCap); patch features map
  one to one (LLaVA-1.5's `mlp2x_gelu`, or a linear layer), or a resampler's learned queries read
  the whole map and become `num_query_tokens` tokens (Qwen-VL, Flamingo's Perceiver resampler).
- Both towers come from their sub-configs through the Auto classes: any causal LM can be the decoder.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionModelWithProjection, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple


try:
    from .configuration_clipqwen import ClipQwenConfig
except ImportError:  # the repository root used as a plain module path (tests, scripts)
    from configuration_clipqwen import ClipQwenConfig

logger = logging.get_logger(__name__)


@dataclass
class ClipQwenModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The projector output at the placeholders: (batch_size, num_image_tokens, hidden_size)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class ClipQwenCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Cross-entropy over the supervised tokens, summed and divided by their count (or by
        `num_items_in_batch`, which Trainer passes so that gradient accumulation is exact).
    logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`, *optional*):
        `None` when `labels` is given: the LM head then runs only at the supervised positions.
    """

    image_hidden_states = ClipQwenModelOutputWithPast.image_hidden_states


def vision_model_class(vision_config):
    """CLIP with its projection head (whose image embedding is the pooled feature), else `AutoModel`'s."""
    if vision_config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModelWithProjection
    return MODEL_MAPPING[type(vision_config)]


class ClipQwenMultiModalProjector(nn.Module):
    """Image features (batch, n, feature_size) → embeddings (batch, num_image_tokens, hidden_size)."""

    def __init__(self, config: ClipQwenConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        # a pooled embedding (the image's, a grid cell's) becomes K tokens through the last layer's width
        # (ClipCap); patches 1:1. The decoder's own positions tell the grid's cells apart, as LLaVA's patches.
        tokens_per_feature = config.num_pooled_image_tokens if config.vision_feature_type != "patch" else 1
        self.hidden_size = hidden
        if config.projector_type == "linear":
            self.layers = nn.Sequential(nn.Linear(config.vision_feature_size, hidden * tokens_per_feature))
        else:  # mlp2x_gelu
            self.layers = nn.Sequential(
                nn.Linear(config.vision_feature_size, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden * tokens_per_feature),
            )

    def forward(self, vision_embeds: torch.Tensor) -> torch.Tensor:
        projected = self.layers(vision_embeds.to(self.layers[0].weight.dtype))
        return projected.reshape(projected.shape[0], -1, self.hidden_size)


class ClipQwenResampler(nn.Module):
    """Feature map (batch, positions, feature_size) → (batch, num_query_tokens, hidden_size): every token is
    the map's mean (what the pooled ClipCap projector reads) plus what one learned query reads from the map by
    cross-attention (Qwen-VL's one-layer resampler), through a GELU and a projection as in the MLP projector.
    The decoder sees a few tokens, as with a pooled embedding, but each can say where in the image things are."""

    head_dim = 64  # as CLIP's and Qwen-VL's attention heads; one head when the width is not a multiple

    def __init__(self, config: ClipQwenConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.hidden_size = hidden
        self.num_heads = hidden // self.head_dim if hidden % self.head_dim == 0 else 1
        self.query = nn.Parameter(torch.empty(config.num_query_tokens, hidden))
        self.position_embedding = nn.Parameter(torch.empty(config.num_feature_positions, hidden))
        self.feature_proj = nn.Linear(config.vision_feature_size, hidden)
        self.query_norm = nn.LayerNorm(hidden)
        self.feature_norm = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (batch, heads, length, head width)

    def forward(self, vision_embeds: torch.Tensor) -> torch.Tensor:
        features = self.feature_proj(vision_embeds.to(self.feature_proj.weight.dtype)) + self.position_embedding
        keys_values = self.feature_norm(features)
        queries = self.query_norm(self.query).expand(features.shape[0], -1, -1)
        attended = nn.functional.scaled_dot_product_attention(
            self._heads(self.q_proj(queries)),
            self._heads(self.k_proj(keys_values)),
            self._heads(self.v_proj(keys_values)),
        )
        # The mean carries the whole image into every token from the first step. Without it (Qwen-VL's form, with
        # LayerNorms after the attention) the near-uniform attention of early training averaged the image away and
        # the tokens became a fixed prompt the decoder read instead of the photo; with the learned queries as the
        # residual instead (Flamingo's, BLIP-2's), the same: on Flickr8k, 150 steps, 3 distinct captions of 250.
        tokens = features.mean(dim=1, keepdim=True) + self.o_proj(attended.transpose(1, 2).flatten(2))
        return self.proj(nn.functional.gelu(tokens))


def multi_modal_projector(config: ClipQwenConfig) -> nn.Module:
    """The projector `config.projector_type` names, newly initialised by the caller's `_init_weights`."""
    return ClipQwenResampler(config) if config.projector_type == "resampler" else ClipQwenMultiModalProjector(config)


class ClipQwenPreTrainedModel(PreTrainedModel):
    config: ClipQwenConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # the decoder's own `_no_split_modules` (Qwen3DecoderLayer, ...) are added by post_init
    _no_split_modules = ["CLIPEncoderLayer", "EfficientNetBlock", "Dinov2Layer"]
    _skip_keys_device_placement = "cache"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ClipQwenResampler):
            init.normal_(module.query, std=self.config.get_text_config().initializer_range)
            init.zeros_(module.position_embedding)  # the map's order is learned from the data

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen tower computes as in inference while the rest trains: a CNN's BatchNorm would
        # otherwise normalise with batch statistics and overwrite its pretrained running ones.
        tower = self.get_encoder(modality="image")
        if mode and not any(parameter.requires_grad for parameter in tower.parameters()):
            tower.eval()
        return self


class ClipQwenModel(ClipQwenPreTrainedModel):
    """The image tower, the projector and the decoder body, without a language-modelling head."""

    def __init__(self, config: ClipQwenConfig):
        super().__init__(config)
        self.vision_tower = vision_model_class(config.vision_config)._from_config(config.vision_config)
        self.multi_modal_projector = multi_modal_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _vision_tower(self, pixel_values: torch.FloatTensor, **kwargs):
        """The tower's outputs and the features the projector reads: pooled (batch, feature_size),
        CLIP's `image_embeds` or a `pooler_output`; patches (batch, positions, feature_size), CLIP's
        `vision_feature_layer` states or a CNN's final map flattened; or the grid (batch, 1 + cells,
        feature_size): the whole image's feature, then each cell's mean over the map, row by row."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        feature_type = self.config.vision_feature_type
        if self.config.vision_config.model_type == "efficientnet":
            outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
            if feature_type == "pooled":
                return outputs, outputs.pooler_output
            feature_map = outputs.last_hidden_state  # (b, c, h, w)
            if feature_type == "patch":
                return outputs, feature_map.flatten(2).transpose(1, 2)  # (b, h·w, c)
            return outputs, self._grid(outputs.pooler_output, feature_map)
        if feature_type == "pooled":
            outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
            return outputs, outputs.image_embeds if "image_embeds" in outputs else outputs.pooler_output
        requested = kwargs.pop("output_hidden_states", None)
        if requested is None:
            requested = self.vision_tower.config.output_hidden_states
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        embeds = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_config.model_type == "dinov2":  # read normalised, as DINOv2's heads are trained
            embeds = self.vision_tower.layernorm(embeds)
        if not requested:  # read for the features, not asked for by the caller
            outputs.hidden_states = None
        if feature_type == "grid":
            side = self.config.feature_map_side
            patches = embeds[:, 1:].transpose(1, 2).unflatten(2, (side, side))  # (b, width, side, side)
            return outputs, self._grid(embeds[:, 0], patches)
        return outputs, embeds

    def _grid(self, whole: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        """(b, width) and (b, width, h, w) → (b, 1 + g², width): the whole image first, then the cells' means."""
        cells = nn.functional.adaptive_avg_pool2d(feature_map, self.config.vision_grid_size)
        return torch.cat([whole[:, None], cells.flatten(2).transpose(1, 2)], dim=1)

    def get_vision_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """The image tower alone: what a feature cache stores and `vision_embeds=` takes back (this
        model's extension; LLaVA's `mm_encoder_outputs` holds projector outputs instead)."""
        return self._vision_tower(pixel_values)[1]

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_embeds: torch.Tensor | None = None, **kwargs
    ) -> tuple | BaseModelOutputWithPooling:
        """The tower's outputs with the projector's as `pooler_output` (batch, num_image_tokens,
        hidden_size); from `vision_embeds`, only `pooler_output` is set."""
        if vision_embeds is None:
            outputs, vision_embeds = self._vision_tower(pixel_values, **kwargs)
        else:
            outputs = BaseModelOutputWithPooling()
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.multi_modal_projector(vision_embeds),
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),  # a CNN has none
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """Where the image features go: the placeholder ids, or with `inputs_embeds` alone the
        positions holding the placeholder's embedding (LLaVA's rule); as many as the features."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == placeholder).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        found, expected = mask.sum(), image_features.shape[0] * image_features.shape[1]
        torch_compilable_check(
            found == expected,
            lambda: (
                f"The text has {int(found)} image placeholder tokens (id {self.config.image_token_id}) but the "
                f"images give {expected} feature vectors ({image_features.shape[0]} images × "
                f"{image_features.shape[1]} tokens). Build inputs with ClipQwenProcessor, whose num_image_tokens "
                "must equal the model config's num_image_tokens."
            ),
        )
        return mask.unsqueeze(-1).expand_as(inputs_embeds)

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
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple | ClipQwenModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if pixel_values is not None and vision_embeds is not None:
            raise ValueError("Pass pixel_values or vision_embeds, not both.")
        if self.config.image_token_id is None:
            raise ValueError(
                "config.image_token_id is not set: this decoder's placeholder id comes from its "
                "tokenizer. Build a ClipQwenProcessor from that tokenizer, then call "
                "`model.resize_token_embeddings(len(processor.tokenizer))` and set "
                "`model.config.image_token_id = processor.image_token_id`."
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = None
        if pixel_values is not None or vision_embeds is not None:
            image_outputs = self.get_image_features(pixel_values, vision_embeds, return_dict=True, **kwargs)
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return ClipQwenModelOutputWithPast(**outputs, image_outputs=image_outputs)


class ClipQwenForConditionalGeneration(ClipQwenPreTrainedModel, GenerationMixin):
    """The captioner: `ClipQwenModel` and the decoder's LM head. Use `generate()` for captions.

    Two extensions to LLaVA's interface: `vision_embeds` (precomputed `get_vision_embeds`, a feature
    cache) may replace `pixel_values`, and with `labels` the LM head runs only at the supervised
    positions (the loss is returned, the logits are not)."""

    _tp_plan = {"lm_head": "colwise_gather_output"}  # LLaVA's: sharded as the embedding it is tied to

    def __init__(self, config: ClipQwenConfig):
        super().__init__(config)
        self.model = ClipQwenModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # LLaVA names the decoder's embedding `embed_tokens`; any causal LM's is found by what it is
        embedding = self.model.get_input_embeddings()
        name = next(name for name, module in self.model.language_model.named_modules() if module is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()
        if self.generation_config.pad_token_id is None:  # Qwen3-Base pads with its EOS, <|endoftext|>
            self.generation_config.pad_token_id = config.text_config.eos_token_id
        # a generated placeholder would be an image position without an image: never a caption token
        self.generation_config.suppress_tokens = [] if config.image_token_id is None else [config.image_token_id]

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_vision_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        return self.model.get_vision_embeds(pixel_values)

    def get_image_features(self, pixel_values=None, vision_embeds=None, **kwargs):
        return self.model.get_image_features(pixel_values, vision_embeds, **kwargs)

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
            Token ids with `num_image_tokens` placeholders (`config.image_token_id`) per image, as
            ClipQwenProcessor writes them.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
            Images as the processor prepares them.
        vision_embeds (`torch.FloatTensor`, *optional*):
            Precomputed `get_vision_embeds` (a feature cache), used instead of `pixel_values`.
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
            Target ids, -100 where nothing is supervised (placeholders never are); shifted inside,
            as in every causal LM.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            vision_embeds=vision_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            # The LM head is a quarter of a token's forward cost: apply it only where a target
            # exists. A placeholder is never one, even where a collator labels every token (TRL's
            # for chat data): its embedding is replaced, and generation never writes it.
            shift_labels = labels[:, 1:].to(hidden_states.device)
            supervised = (shift_labels != -100) & (shift_labels != self.config.image_token_id)
            selected_logits = self.lm_head(hidden_states[:, :-1][supervised]).float()
            loss = nn.functional.cross_entropy(selected_logits, shift_labels[supervised], reduction="sum")
            denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum()
            loss = loss / torch.as_tensor(denominator, device=loss.device).clamp(min=1)
        else:
            # A copy in standard strides: on a CPU, a bf16 linear layer given the prefill's slice (each row's last
            # position) takes a slow path (torch 2.13): with 192 beam rows it broadcast its weight to every row (30 s
            # against 0.06 s), and at one row, where .contiguous() keeps the slice's strides, Qwen3's LM head took
            # 1.9 s against 34 ms.
            kept = slice_logits_to_keep(hidden_states, logits_to_keep).clone(memory_format=torch.contiguous_format)
            logits = self.lm_head(kept)

        return ClipQwenCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        # Image features enter once, at prefill; later steps read them from the KV cache. (generate
        # drops pixel_values after prefill itself; vision_embeds is ours.)
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("vision_embeds", None)
        return model_inputs


# Checkpoints keep the key layout of the first release, from before the base/head split
# (transformers saves the original layout and maps it on load, as for LLaVA). `overwrite`: the
# module is imported once per folder it ships in.
register_checkpoint_conversion_mapping(
    "ClipQwenForConditionalGeneration",
    [
        WeightRenaming(source_patterns=r"^language_model.lm_head", target_patterns="lm_head"),
        WeightRenaming(source_patterns=r"^language_model.model", target_patterns="model.language_model"),
        WeightRenaming(source_patterns=r"^vision_model", target_patterns="model.vision_tower"),
        WeightRenaming(source_patterns=r"^adapter", target_patterns="model.multi_modal_projector"),
    ],
    overwrite=True,
)

# Registered at import so that every save_pretrained — Trainer checkpoints included — writes the .py
# files and the auto_map that `trust_remote_code=True` loading needs.
ClipQwenConfig.register_for_auto_class()
ClipQwenForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "ClipQwenForConditionalGeneration",
    "ClipQwenModel",
    "ClipQwenMultiModalProjector",
    "ClipQwenPreTrainedModel",
    "ClipQwenResampler",
    "multi_modal_projector",
    "vision_model_class",
]
