"""Any image tower before the projector: CLIP (the default), an EfficientNet or a DINOv2, built from
`config.vision_config`."""

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, Dinov2Model, EfficientNetModel, Qwen3ForCausalLM

from clipqwen.backbones.assemble import from_pretrained_backbones
from clipqwen.tiny import TINY_EFFICIENTNET, bundled_processor, tiny_config
from clipqwen.training.freezing import freeze_backbones
from modeling_clipqwen import ClipQwenForConditionalGeneration

from conftest import PHOTOS
from test_remote_code import assert_fresh_process_matches


def efficientnet_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(vision_config=dict(TINY_EFFICIENTNET), vision_feature_layer=-1, **overrides)
    model = ClipQwenForConditionalGeneration(config).eval()
    for module in model.model.vision_tower.modules():  # non-trivial BatchNorm statistics, so that eval vs train shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


# DINOv2's layout at the processor's 224 px with fewer, wider patches: 7×7 + CLS
TINY_DINOV2 = dict(
    model_type="dinov2",
    image_size=224,
    patch_size=32,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_ratio=2,
    use_mask_token=False,
)


def dinov2_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = ClipQwenForConditionalGeneration(tiny_config(vision_config=dict(TINY_DINOV2), **overrides)).eval()
    with torch.no_grad():  # a final LayerNorm that is not the identity, so that reading the states without it shows
        model.model.vision_tower.layernorm.weight.uniform_(0.5, 2.0)
        model.model.vision_tower.layernorm.bias.uniform_(-1.0, 1.0)
    return model


@pytest.mark.parametrize(
    "feature_type, projector, tokens",
    [("pooled", "mlp2x_gelu", 3), ("patch", "mlp2x_gelu", 49), ("patch", "resampler", 5), ("grid", "mlp2x_gelu", 15)],
)
def test_efficientnet_features_become_image_tokens(feature_type, projector, tokens, photos):
    model = efficientnet_model(
        vision_feature_type=feature_type, projector_type=projector, num_pooled_image_tokens=3, num_query_tokens=5
    )
    processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
    assert isinstance(model.model.vision_tower, EfficientNetModel)
    assert model.config.num_image_tokens == tokens  # 224 px / total stride 32 = a 7×7 map, no CLS
    batch = processor(images=photos[:2], suffix=["a cat.", "two dogs on grass."])
    embeds = model.get_vision_embeds(batch["pixel_values"])
    assert embeds.shape == {"pooled": (2, 128), "patch": (2, 49, 128), "grid": (2, 5, 128)}[feature_type]
    if feature_type == "grid":  # the image's mean, then the 2×2 cells' (their order: the DINOv2 test's map varies)
        feature_map = model.model.vision_tower(pixel_values=batch["pixel_values"]).last_hidden_state
        torch.testing.assert_close(embeds[:, 0], feature_map.mean((2, 3)))
        torch.testing.assert_close(embeds[:, 1], feature_map[:, :, :4, :4].mean((2, 3)))  # adaptive cells overlap
    from_pixels = model(**batch).loss
    from_features = model(**{k: v for k, v in batch.items() if k != "pixel_values"}, vision_embeds=embeds).loss
    torch.testing.assert_close(from_pixels, from_features)
    ids = model.generate(**processor(images=photos[:2]), max_new_tokens=4, min_new_tokens=4)
    assert ids.shape == (2, tokens + 4)


@pytest.mark.parametrize(
    "feature_type, layer, projector, tokens",
    [
        ("pooled", -2, "mlp2x_gelu", 3),
        ("patch", -1, "mlp2x_gelu", 50),
        ("patch", -2, "resampler", 5),
        ("grid", -1, "mlp2x_gelu", 15),
    ],
)
def test_dinov2_features_become_image_tokens(feature_type, layer, projector, tokens, photos):
    """Pooled: the CLS token after the final LayerNorm (Dinov2Model's pooler_output). Patch: CLS + patch states of
    `vision_feature_layer` through that LayerNorm, so that -1 is `last_hidden_state`."""
    model = dinov2_model(
        vision_feature_type=feature_type,
        vision_feature_layer=layer,
        projector_type=projector,
        num_pooled_image_tokens=3,
        num_query_tokens=5,
    )
    processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
    assert isinstance(model.model.vision_tower, Dinov2Model) and model.config.num_image_tokens == tokens
    batch = processor(images=photos[:2], suffix=["a cat.", "two dogs on grass."])
    embeds = model.get_vision_embeds(batch["pixel_values"])
    tower = model.model.vision_tower(pixel_values=batch["pixel_values"], output_hidden_states=True)
    expected = {
        ("pooled", -2): tower.last_hidden_state[:, 0],
        ("patch", -1): tower.last_hidden_state,
        ("patch", -2): model.model.vision_tower.layernorm(tower.hidden_states[-2]),
        # the CLS state, then the 2×2 cells' means of the 7×7 patch states (row-major), which overlap at the middle
        ("grid", -1): torch.stack(
            [tower.last_hidden_state[:, 0]]
            + [
                tower.last_hidden_state[:, 1:].unflatten(1, (7, 7))[:, rows, columns].mean((1, 2))
                for rows in (slice(0, 4), slice(3, 7))
                for columns in (slice(0, 4), slice(3, 7))
            ],
            dim=1,
        ),
    }[feature_type, layer]
    torch.testing.assert_close(embeds, expected)
    assert embeds.shape == {"pooled": (2, 32), "patch": (2, 50, 32), "grid": (2, 5, 32)}[feature_type]
    from_pixels = model(**batch).loss
    from_features = model(**{k: v for k, v in batch.items() if k != "pixel_values"}, vision_embeds=embeds).loss
    torch.testing.assert_close(from_pixels, from_features)
    ids = model.generate(**processor(images=photos[:2]), max_new_tokens=4, min_new_tokens=4)
    assert ids.shape == (2, tokens + 4)


def test_from_pretrained_backbones_takes_a_dinov2_checkpoint_and_the_captioner_saves_and_loads(tmp_path, photos):
    reference = dinov2_model()
    reference.model.vision_tower.save_pretrained(tmp_path / "dinov2")
    Qwen3ForCausalLM(reference.config.text_config).save_pretrained(tmp_path / "qwen3")
    layout = dict(projector_type="resampler", vision_feature_type="patch", vision_feature_layer=-1, num_query_tokens=3)
    model = from_pretrained_backbones(str(tmp_path / "dinov2"), str(tmp_path / "qwen3"), **layout).eval()
    assert type(AutoModel.from_pretrained(tmp_path / "dinov2")) is Dinov2Model
    for name, tensor in reference.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    assert model.config.vision_feature_size == 32 and model.config.num_feature_positions == 50
    processor = bundled_processor(num_image_tokens=3)
    batch = processor(images=photos[:2], suffix=["a cat.", "a dog."])
    model.save_pretrained(tmp_path / "captioner")
    loaded = ClipQwenForConditionalGeneration.from_pretrained(tmp_path / "captioner").eval()
    assert loaded.config.vision_config.model_type == "dinov2"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss, rtol=0, atol=0)


def test_a_frozen_batchnorm_tower_keeps_its_statistics_while_the_rest_trains(photos):
    model = efficientnet_model(vision_feature_type="patch")
    processor = bundled_processor(num_image_tokens=49)
    freeze_backbones(model, vision=True, language=False)
    before = {name: tensor.clone() for name, tensor in model.model.vision_tower.state_dict().items()}
    model.train()
    assert not model.model.vision_tower.training and model.model.language_model.training
    loss = model(**processor(images=photos[:2], suffix=["a cat.", "a dog."])).loss
    loss.backward()
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # running statistics untouched


def test_an_efficientnet_captioner_loads_with_remote_code_in_a_fresh_process(tmp_path):
    model = efficientnet_model(vision_feature_type="patch")
    processor = bundled_processor(num_image_tokens=49)
    processor.prompt = "Image:<|image_pad|>"  # saved with the processor: the reloaded one prompts the same way
    folder = tmp_path / "clipqwen-efficientnet"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    photo = sorted(PHOTOS.glob("*.jpg"))[1]
    child = assert_fresh_process_matches(model, processor, folder, photo, tmp_path / "elsewhere")
    assert child["decoder"] == "Qwen3Model"


@pytest.mark.parametrize(
    "layout, tokens",
    [
        (dict(projector_type="mlp2x_gelu", num_pooled_image_tokens=2), 2),
        (
            dict(projector_type="resampler", vision_feature_type="patch", vision_feature_layer=-1, num_query_tokens=3),
            3,
        ),
    ],
)
def test_from_pretrained_backbones_takes_an_efficientnet_checkpoint(tmp_path, photos, layout, tokens):
    reference = efficientnet_model(vision_feature_type="pooled")
    reference.model.vision_tower.save_pretrained(tmp_path / "efficientnet")
    Qwen3ForCausalLM(reference.config.text_config).save_pretrained(tmp_path / "qwen3")
    model = from_pretrained_backbones(str(tmp_path / "efficientnet"), str(tmp_path / "qwen3"), **layout)
    assert isinstance(model.model.vision_tower, EfficientNetModel)
    assert type(AutoModel.from_pretrained(tmp_path / "efficientnet")) is EfficientNetModel
    for name, tensor in reference.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    assert model.config.num_image_tokens == tokens and model.config.vision_feature_size == 128
    # the projector the layout names, so that its output fills exactly the processor's placeholders
    processor = bundled_processor(num_image_tokens=tokens)
    assert model(**processor(images=photos[:1], suffix=["a cat."])).loss.isfinite()


def test_unsupported_towers_and_layers_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="vision_config has model_type='siglip_vision_model'"):
        tiny_config(vision_config={"model_type": "siglip_vision_model"})
    with pytest.raises(StrictDataclassError, match="final feature map only; use -1"):
        tiny_config(vision_config=dict(TINY_EFFICIENTNET), vision_feature_type="patch", vision_feature_layer=-2)


def test_a_saved_batchnorm_captioner_loaded_to_train_again_keeps_its_frozen_tower_in_inference_mode(tmp_path):
    """`run_captioning.py --model_name_or_path` loads in training mode, then freezes: the tower must end in eval
    mode (it stayed in training mode, and the Flickr8k captioner re-evaluated from its export scored CIDEr-D 0.25
    for 0.37: its features were computed with batch statistics)."""
    import run_captioning

    folder = tmp_path / "saved"
    saved = efficientnet_model(vision_feature_type="pooled")
    saved.save_pretrained(folder)
    bundled_processor(num_image_tokens=saved.config.num_image_tokens).save_pretrained(folder)
    model_args = run_captioning.parse_args(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path)])[0]
    model, _ = run_captioning.build_model_and_processor(model_args)
    assert model.training and model.model.multi_modal_projector.training and not model.model.vision_tower.training


@pytest.mark.parametrize(
    "make",
    [lambda: efficientnet_model(vision_feature_type="pooled"), lambda: dinov2_model(vision_feature_type="patch")],
)
def test_the_feature_cache_holds_inference_features_whatever_mode_the_tower_is_in(tmp_path, photos, make):
    import datasets

    from clipqwen.data.feature_cache import add_vision_features

    model = make().train()  # not frozen: the tower trains too
    processor = bundled_processor(num_image_tokens=model.config.num_image_tokens)
    for index, photo in enumerate(photos[:2]):
        photo.save(tmp_path / f"{index}.png")
    dataset = datasets.Dataset.from_dict(
        {
            "image_id": ["0", "1"],
            "image": [str(tmp_path / "0.png"), str(tmp_path / "1.png")],
            "captions": [["a photo"], ["another"]],
        }
    ).cast_column("image", datasets.Image())
    cached = add_vision_features(dataset, model, processor, tmp_path / "features", batch_size=2)
    assert model.model.vision_tower.training  # given back in the mode it came in
    with torch.no_grad():
        expected = model.eval().get_vision_embeds(processor(images=photos[:2])["pixel_values"])
    torch.testing.assert_close(torch.as_tensor(np.stack(cached["vision_embeds"])), expected, rtol=1e-5, atol=1e-6)
