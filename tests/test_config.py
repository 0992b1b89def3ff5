import pytest
from transformers import CLIPVisionConfig, LlamaConfig, Qwen3Config

from configuration_clipqwen import ClipQwenConfig


def test_defaults_are_the_real_clip_b32_and_qwen3_0_6b_base():
    config = ClipQwenConfig()
    vision, text = config.vision_config, config.text_config
    assert vision.to_dict() == CLIPVisionConfig(projection_dim=512).to_dict()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.patch_size, vision.image_size, vision.projection_dim, vision.hidden_act) == (32, 224, 512, "quick_gelu")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (1024, 28, 16, 8)
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (128, 3072, 151936)
    assert text.tie_word_embeddings and config.tie_word_embeddings
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert text.max_position_embeddings == 32768 and text.bos_token_id == text.eos_token_id == 151643
    # the seed-exact preset: pooled 512-d embedding -> Linear(512, 1024) -> one image token
    assert (config.adapter_type, config.vision_feature_type, config.num_image_tokens) == ("linear", "pooled", 1)
    assert config.image_token_id == 151655 and config.freeze_vision_model and config.freeze_language_model


def test_partial_text_config_is_merged_over_qwen3_0_6b_not_class_defaults():
    config = ClipQwenConfig(text_config={"num_hidden_layers": 2})
    assert config.text_config.num_hidden_layers == 2
    assert config.text_config.hidden_size == 1024 and config.text_config.num_key_value_heads == 8
    assert len(config.text_config.layer_types) == 2


def test_any_causal_lm_text_config_by_model_type_with_its_own_defaults(tmp_path):
    config = ClipQwenConfig(text_config={"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                         "vocab_size": 300, "tie_word_embeddings": False}, image_token_id=None)
    assert type(config.text_config) is LlamaConfig and config.image_token_id is None
    assert config.text_config.num_hidden_layers == LlamaConfig().num_hidden_layers  # Llama's defaults, not Qwen3-0.6B's
    assert not config.tie_word_embeddings  # follows the decoder
    config.save_pretrained(tmp_path)
    reloaded = ClipQwenConfig.from_pretrained(tmp_path)
    assert type(reloaded.text_config) is LlamaConfig and reloaded.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="image_token_id"):
        ClipQwenConfig(text_config={"model_type": "llama", "vocab_size": 300})  # Qwen3's 151655 is out of range


def test_a_qwen3_dict_naming_its_model_type_is_merged_too():
    config = ClipQwenConfig(text_config={"model_type": "qwen3", "num_hidden_layers": 2})
    assert type(config.text_config) is Qwen3Config and config.text_config.hidden_size == 1024


def test_patch_features_take_cls_plus_patch_grid_tokens():
    assert ClipQwenConfig(vision_feature_type="patch").num_image_tokens == 50
    assert ClipQwenConfig(num_pooled_image_tokens=4).num_image_tokens == 4


def test_round_trips(tmp_path):
    config = ClipQwenConfig(adapter_type="mlp2x_gelu", vision_feature_type="patch", text_config={"num_hidden_layers": 3})
    assert ClipQwenConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    reloaded = ClipQwenConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.text_config.num_hidden_layers == 3 and reloaded.adapter_type == "mlp2x_gelu"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"adapter_type": "transformer"}, "adapter_type"),
        ({"vision_feature_type": "cls"}, "vision_feature_type"),
        ({"num_pooled_image_tokens": 0}, "num_pooled_image_tokens"),
        ({"vision_feature_layer": 40}, "vision_feature_layer"),
        ({"image_token_id": 10**7}, "image_token_id"),
        ({"vision_config": {"image_size": 100, "patch_size": 32}}, "image_size"),
    ],
)
def test_wrong_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClipQwenConfig(**kwargs)
