import dataclasses
import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedConfig, Qwen3Config

from configuration_clipqwen import ClipQwenConfig


def test_defaults_are_the_real_clip_b32_and_qwen3_0_6b_base():
    config = ClipQwenConfig()
    vision, text = config.vision_config, config.text_config
    assert vision.to_dict() == CLIPVisionConfig(projection_dim=512).to_dict()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.patch_size, vision.image_size, vision.projection_dim) == (32, 224, 512)
    assert vision.hidden_act == "quick_gelu"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 28, 16)
    assert text.num_key_value_heads == 8
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (128, 3072, 151936)
    assert text.tie_word_embeddings and config.tie_word_embeddings
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert text.max_position_embeddings == 32768 and text.bos_token_id == text.eos_token_id == 151643
    # the ClipCap layout, which learned from real photos: pooled 512-d embedding -> MLP -> 8 image tokens
    assert (config.projector_type, config.vision_feature_type, config.num_image_tokens) == ("mlp2x_gelu", "pooled", 8)
    assert config.image_token_id == 151655


def test_a_saved_config_names_its_layout_so_changed_defaults_never_reread_it(tmp_path):
    """The default layout changed (seed → ClipCap): a checkpoint saved in the seed layout must still load as one,
    which holds because config.json names every layout field, defaults included."""
    ClipQwenConfig(projector_type="linear", num_pooled_image_tokens=1).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {key: saved[key] for key in ("projector_type", "vision_feature_type", "num_pooled_image_tokens")} == {
        "projector_type": "linear",
        "vision_feature_type": "pooled",
        "num_pooled_image_tokens": 1,
    }
    ClipQwenConfig().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["projector_type"] == "mlp2x_gelu"  # defaults written too
    assert ClipQwenConfig.from_pretrained(tmp_path).num_image_tokens == 8


def test_a_config_saved_with_the_old_name_adapter_type_loads_checked(tmp_path):
    """`projector_type` was `adapter_type`: configs saved then load with their projector, and a wrong value still
    fails naming the field."""
    ClipQwenConfig().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["adapter_type"] = saved.pop("projector_type")
    (tmp_path / "config.json").write_text(json.dumps(saved | {"adapter_type": "linear", "num_pooled_image_tokens": 1}))
    config = ClipQwenConfig.from_pretrained(tmp_path)
    assert (config.projector_type, config.num_image_tokens) == ("linear", 1) and "adapter_type" not in config.to_dict()
    with pytest.raises(StrictDataclassError, match="projector_type"):
        ClipQwenConfig(adapter_type="transformer")


def test_partial_text_config_is_merged_over_qwen3_0_6b_not_class_defaults():
    config = ClipQwenConfig(text_config={"num_hidden_layers": 2})
    assert config.text_config.num_hidden_layers == 2
    assert config.text_config.hidden_size == 1024 and config.text_config.num_key_value_heads == 8
    assert len(config.text_config.layer_types) == 2


def test_any_causal_lm_text_config_by_model_type_with_its_own_defaults(tmp_path):
    config = ClipQwenConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "vocab_size": 300,
            "tie_word_embeddings": False,
        },
        image_token_id=None,
    )
    assert type(config.text_config) is LlamaConfig and config.image_token_id is None
    # Llama's defaults, not Qwen3-0.6B's
    assert config.text_config.num_hidden_layers == LlamaConfig().num_hidden_layers
    assert not config.tie_word_embeddings  # follows the decoder
    config.save_pretrained(tmp_path)
    reloaded = ClipQwenConfig.from_pretrained(tmp_path)
    assert type(reloaded.text_config) is LlamaConfig and reloaded.to_dict() == config.to_dict()
    with pytest.raises(StrictDataclassError, match="image_token_id"):
        ClipQwenConfig(text_config={"model_type": "llama", "vocab_size": 300})  # Qwen3's 151655 is out of range


def test_a_qwen3_dict_naming_its_model_type_is_merged_too():
    config = ClipQwenConfig(text_config={"model_type": "qwen3", "num_hidden_layers": 2})
    assert type(config.text_config) is Qwen3Config and config.text_config.hidden_size == 1024


def test_patch_features_take_cls_plus_patch_grid_tokens():
    assert ClipQwenConfig(vision_feature_type="patch").num_image_tokens == 50
    assert ClipQwenConfig(num_pooled_image_tokens=4).num_image_tokens == 4


def test_the_grid_takes_the_image_and_each_cell_as_pooled_embeddings():
    config = ClipQwenConfig(vision_feature_type="grid", vision_grid_size=3, num_pooled_image_tokens=2)
    assert (config.num_image_tokens, config.vision_feature_size) == ((1 + 9) * 2, 768)  # CLIP's states, not 512
    efficientnet = ClipQwenConfig(
        vision_feature_type="grid",
        vision_feature_layer=-1,
        vision_config={"model_type": "efficientnet", "image_size": 224},
    )
    assert (efficientnet.feature_map_side, efficientnet.num_image_tokens) == (7, 5 * 8)
    with pytest.raises(StrictDataclassError, match="vision_grid_size=8 is larger than the tower's 7×7 feature map"):
        ClipQwenConfig(vision_feature_type="grid", vision_grid_size=8)
    with pytest.raises(StrictDataclassError, match="vision_feature_layer=-2: an EfficientNet offers its final"):
        ClipQwenConfig(vision_feature_type="grid", vision_config={"model_type": "efficientnet", "image_size": 224})


def test_the_resampler_takes_its_query_count_and_reads_the_feature_map():
    config = ClipQwenConfig(projector_type="resampler", vision_feature_type="patch", num_query_tokens=6)
    assert (config.num_image_tokens, config.num_feature_positions) == (6, 50)
    efficientnet = ClipQwenConfig(
        projector_type="resampler",
        vision_feature_type="patch",
        vision_feature_layer=-1,
        vision_config={"model_type": "efficientnet", "image_size": 224},
    )
    assert (efficientnet.num_image_tokens, efficientnet.num_feature_positions) == (8, 49)
    with pytest.raises(StrictDataclassError, match='projector_type="resampler".*vision_feature_type="patch"'):
        ClipQwenConfig(projector_type="resampler")  # a pooled embedding is no map to attend over


def test_round_trips(tmp_path):
    config = ClipQwenConfig(
        projector_type="mlp2x_gelu", vision_feature_type="patch", text_config={"num_hidden_layers": 3}
    )
    assert ClipQwenConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    reloaded = ClipQwenConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.text_config.num_hidden_layers == 3 and reloaded.projector_type == "mlp2x_gelu"


# One wrong type and one wrong value for every field ClipQwenConfig declares (None: the type admits no wrong
# value). A field added without a row here fails test_every_field_has_a_bad_type_and_a_bad_value.
BAD = {
    "vision_config": ("clip", {"image_size": 100, "patch_size": 32}),
    "text_config": (5, {"model_type": "no-such-model"}),
    "projector_type": (1, "transformer"),
    "vision_feature_type": (1, "cls"),
    "num_pooled_image_tokens": ("2", 0),
    "vision_grid_size": ("2", 0),
    "num_query_tokens": ("2", 0),
    "vision_feature_layer": ("x", 40),
    "image_token_id": ("5", 10**7),
    "tie_word_embeddings": ("no", None),
}
OWN_FIELDS = sorted(
    set(ClipQwenConfig.__annotations__) - set(PreTrainedConfig.__annotations__) | {"tie_word_embeddings"}
)


def test_every_field_has_a_bad_type_and_a_bad_value():
    assert set(OWN_FIELDS) <= {f.name for f in dataclasses.fields(ClipQwenConfig)}
    assert sorted(BAD) == OWN_FIELDS


@pytest.mark.parametrize("kind", ["type", "value"])
@pytest.mark.parametrize("field", OWN_FIELDS)
def test_a_wrong_type_or_value_in_any_field_fails_naming_the_field(field, kind):
    bad = BAD[field][0 if kind == "type" else 1]
    if bad is None:
        pytest.skip(f"{field}: a {kind} that is wrong for it is not possible (the annotation admits every value)")
    # the config's own validation (`@strict`) or, for an unknown sub-config model_type, the check before it
    with pytest.raises((StrictDataclassError, ValueError), match=field):
        ClipQwenConfig(**{field: bad})


def test_wrong_values_are_also_refused_on_assignment():
    config = ClipQwenConfig()
    with pytest.raises(StrictDataclassError, match="num_pooled_image_tokens"):
        config.num_pooled_image_tokens = 0
    with pytest.raises(StrictDataclassError, match="projector_type"):
        config.projector_type = "transformer"


def test_training_flags_are_not_in_the_config(tmp_path):
    ClipQwenConfig(text_config={"num_hidden_layers": 2}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any(key.startswith("freeze_") for key in saved)
