"""EfficientNet-Lite0 as a stock transformers EfficientNetModel (clipqwen.backbones.efficientnet_lite), checked against
an independent forward of the lukemelas Lite0 recipe written here in plain torch, with random weights in the lukemelas
layout. The real ImageNet weights are checked only where they are on disk: set CLIPQWEN_LITE0_WEIGHTS to the .pth
(`python -m clipqwen.backbones efficientnet-lite0 OUTPUT_DIR` prints where it fetched it)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, EfficientNetModel

from clipqwen.backbones import efficientnet_lite as lite
from clipqwen.backbones.__main__ import main as convert_main
from clipqwen.backbones.assemble import tower_image_processor
from clipqwen.backbones.wheel_weights import CONVERSION_STAMP


PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "coco-cc-by"
# (kernel, stride, repeats, expand ratio, output channels) of each stage; stem 32 channels, head 1280
STAGES = [
    (3, 1, 1, 1, 16),
    (3, 2, 2, 6, 24),
    (5, 2, 2, 6, 40),
    (3, 2, 3, 6, 80),
    (5, 1, 3, 6, 112),
    (5, 2, 4, 6, 192),
    (3, 1, 1, 6, 320),
]


def random_lukemelas_state_dict(seed=0):
    """Lite0's 296 tensors in the lukemelas layout; He-scaled convs and BN statistics far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out_channels, in_channels, kernel):
        fan_in = in_channels * kernel * kernel
        weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) * math.sqrt(2 / fan_in)
        sd[f"{name}.weight"] = weight

    def bn(name, channels):
        sd[f"{name}.weight"] = 0.5 + torch.rand(channels, generator=generator)
        sd[f"{name}.bias"] = 0.3 * torch.randn(channels, generator=generator)
        sd[f"{name}.running_mean"] = 0.3 * torch.randn(channels, generator=generator)
        sd[f"{name}.running_var"] = 0.3 + torch.rand(channels, generator=generator)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    index, channels = 0, 32
    for kernel, _, repeats, expand, out_channels in STAGES:
        for _ in range(repeats):
            block, hidden = f"_blocks.{index}", channels * expand
            if expand != 1:
                conv(f"{block}._expand_conv", hidden, channels, 1)
                bn(f"{block}._bn0", hidden)
            conv(f"{block}._depthwise_conv", hidden, 1, kernel)
            bn(f"{block}._bn1", hidden)
            conv(f"{block}._project_conv", out_channels, hidden, 1)
            bn(f"{block}._bn2", out_channels)
            index, channels = index + 1, out_channels
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = 0.01 * torch.randn(1000, 1280, generator=generator)
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


def reference_forward(sd, pixels):
    """lukemelas' EfficientNet with Lite0's settings: TF-"same" padding of every conv computed from its input,
    BN in eval with eps 1e-3, ReLU6, a residual where a block keeps stride 1 and width. Returns (map, pooled)."""

    def conv(x, name, stride=1, groups=1):
        weight = sd[f"{name}.weight"]
        pads = []
        for size, kernel in zip(x.shape[:-3:-1], weight.shape[:-3:-1]):  # width first, as F.pad wants
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)

    def bn(x, name):
        return F.batch_norm(
            x,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=False,
            eps=1e-3,
        )

    x = F.relu6(bn(conv(pixels, "_conv_stem", stride=2), "_bn0"))
    index = 0
    for _, stride, repeats, expand, _ in STAGES:
        for repeat in range(repeats):
            block, step = f"_blocks.{index}", stride if repeat == 0 else 1
            h = x
            if expand != 1:
                h = F.relu6(bn(conv(h, f"{block}._expand_conv"), f"{block}._bn0"))
            h = F.relu6(bn(conv(h, f"{block}._depthwise_conv", step, groups=h.shape[1]), f"{block}._bn1"))
            h = bn(conv(h, f"{block}._project_conv"), f"{block}._bn2")
            x = h + x if step == 1 and h.shape == x.shape else h
            index += 1
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return x, x.mean(dim=(2, 3))


def converted_model(sd, **config_overrides):
    config = lite.lite0_config()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = EfficientNetModel(config).eval()
    model.load_state_dict(lite.convert_lite0_state_dict(sd))
    return model


@pytest.fixture(scope="module")
def random_sd():
    return random_lukemelas_state_dict()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item()
    assert scale > 0.1  # not a dead network, which would agree with anything
    assert (actual - expected).abs().max().item() <= rtol * scale


def test_random_weights_match_the_reference_forward(random_sd, pixels):
    with torch.no_grad():
        expected_map, expected_pooled = reference_forward(random_sd, pixels)
        outputs = converted_model(random_sd)(pixels, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (2, 1280, 7, 7)
    assert outputs.pooler_output.shape == (2, 1280)
    assert len(outputs.hidden_states) == 17  # the stem and the 16 blocks; the 1280-wide head is last_hidden_state
    assert (expected_map > 6 - 1e-6).float().mean() > 0  # ReLU6's ceiling is reached, so relu would fail
    assert_close(outputs.last_hidden_state, expected_map)
    assert_close(outputs.pooler_output, expected_pooled)


@pytest.mark.parametrize("wrong", [dict(depthwise_padding=list(range(16))), dict(hidden_act="relu")])
def test_the_comparison_sees_a_wrong_padding_or_activation(random_sd, pixels, wrong):
    with torch.no_grad():
        expected_map, _ = reference_forward(random_sd, pixels)
        actual = converted_model(random_sd, **wrong)(pixels).last_hidden_state
    assert (actual - expected_map).abs().max() > 1e-2


def test_converter_refuses_leftovers_and_keeps_the_classifier_apart(random_sd):
    converted = lite.convert_lite0_state_dict(random_sd)
    assert not any(key.startswith("_") for key in converted)
    classifier = lite.lite0_classifier(random_sd)
    assert torch.equal(classifier.weight, random_sd["_fc.weight"]) and classifier.out_features == 1000
    with pytest.raises(ValueError, match="not a Lite0 state dict"):
        lite.convert_lite0_state_dict({**random_sd, "_blocks.1._se_reduce.weight": torch.zeros(4, 96, 1, 1)})


def test_save_lite0_round_trips_through_auto_classes(tmp_path, random_sd, pixels, monkeypatch):
    source = tmp_path / lite.LITE0.name
    torch.save(random_sd, source)
    folder = lite.save_lite0(tmp_path / "lite0", state_dict_path=source)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model) is EfficientNetModel and model.config.hidden_act == "relu6"
    with torch.no_grad():
        assert torch.equal(model(pixels).pooler_output, converted_model(random_sd)(pixels).pooler_output)
    assert json.loads((folder / CONVERSION_STAMP).read_text())["source_sha256"] == lite.sha256_of(source)
    assert (folder / "model.safetensors").is_file()

    # the same source again: nothing is rebuilt; another source: the folder is replaced whole
    monkeypatch.setattr(lite, "EfficientNetModel", None)
    assert lite.save_lite0(folder, state_dict_path=source) == folder
    monkeypatch.undo()
    torch.save(random_lukemelas_state_dict(seed=1), source)
    lite.save_lite0(folder, state_dict_path=source)
    assert json.loads((folder / CONVERSION_STAMP).read_text())["source_sha256"] == lite.sha256_of(source)
    assert sorted(path.name for path in tmp_path.iterdir()) == [lite.LITE0.name, "lite0"]  # no temporary folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not written by a clipqwen converter"):
        lite.save_lite0(tmp_path / "mine", state_dict_path=source)
    assert (tmp_path / "mine" / "notes.txt").is_file()
    (tmp_path / "legacy").mkdir()  # the converter's folder before conversion.json: replaced, not refused
    (tmp_path / "legacy" / "lite0_manifest.json").write_text("{}")
    lite.save_lite0(tmp_path / "legacy", state_dict_path=source)
    assert sorted(path.name for path in (tmp_path / "legacy").iterdir())[:2] == ["config.json", CONVERSION_STAMP]


def test_the_converter_command_saves_a_folder_and_lists_it(tmp_path, random_sd, capsys):
    source = tmp_path / lite.LITE0.name
    torch.save(random_sd, source)
    convert_main(["efficientnet-lite0", str(tmp_path / "lite0"), "--source", str(source)])
    assert type(AutoModel.from_pretrained(tmp_path / "lite0")) is EfficientNetModel
    assert f"{tmp_path / 'lite0' / 'model.safetensors'} (" in capsys.readouterr().out


def test_saved_image_processor_gives_lite0_normalisation(tmp_path):
    lite.lite0_image_processor().save_pretrained(tmp_path)
    processor = tower_image_processor(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    pixels = processor(Image.fromarray(image), return_tensors="pt").pixel_values[0]
    expected = (torch.from_numpy(image).permute(2, 0, 1).double() - 127) / 128
    assert pixels.shape == (3, 224, 224)
    assert (pixels.double() - expected).abs().max() < 1e-6
    photo = processor(Image.open(PHOTOS / "000000252639.jpg"), return_tensors="pt").pixel_values
    assert photo.shape == (1, 3, 224, 224)


# photo: ImageNet-1k classes its COCO captions name, one of which must be in the top 5 (the horses on a hill,
# 000000078499, are left out: Lite0 says alp, ox, tent, valley, hartebeest)
REAL_PHOTOS = {
    "000000252639.jpg": [874, 829],  # "a long green and white bus": trolleybus (0.92 with the real weights), tram
    "000000125870.jpg": [404],  # "passenger jets parked": airliner
    "000000433998.jpg": [981],  # "a pitcher winds up": baseball player
    "000000107438.jpg": [671, 444],  # "a bike parked under a traffic light": mountain bike, tandem bicycle
}


@pytest.mark.skipif(not os.environ.get("CLIPQWEN_LITE0_WEIGHTS"), reason="CLIPQWEN_LITE0_WEIGHTS (the .pth) unset")
def test_real_weights_name_imagenet_classes_in_real_photos(tmp_path):
    source = Path(os.environ["CLIPQWEN_LITE0_WEIGHTS"])
    assert lite.sha256_of(source) == lite.LITE0.sha256
    folder = lite.save_lite0(tmp_path / "lite0", state_dict_path=source)
    model, processor = AutoModel.from_pretrained(folder).eval(), tower_image_processor(folder)
    sd = torch.load(source, weights_only=True)
    classifier = lite.lite0_classifier(sd)
    pixels = processor([Image.open(PHOTOS / name) for name in REAL_PHOTOS], return_tensors="pt").pixel_values
    with torch.no_grad():
        outputs = model(pixels)
        expected_map, _ = reference_forward(sd, pixels)
        top5 = classifier(outputs.pooler_output).topk(5).indices.tolist()
    assert_close(outputs.last_hidden_state, expected_map)
    for (name, classes), predicted in zip(REAL_PHOTOS.items(), top5):
        assert set(classes) & set(predicted), f"{name}: top 5 {predicted}, expected one of {classes}"


def test_the_feature_pass_tower_computes_what_the_tower_computes(random_sd, pixels):
    from torch import nn
    from transformers.models.efficientnet.modeling_efficientnet import EfficientNetSqueezeExciteLayer

    from clipqwen.backbones.fast_tower import for_inference

    tower = converted_model(random_sd).eval()
    before = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    fast = for_inference(tower)
    # every BatchNorm folded, every (identity) squeeze-excite gone: the work the rewrite exists to remove
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fast.modules())
    assert not any(isinstance(module, EfficientNetSqueezeExciteLayer) for module in fast.modules())
    with torch.no_grad():
        exact = converted_model(random_sd).double().eval()(pixels.double())
        expected, actual = tower(pixels), fast(pixels)
    # "the same to rounding": the rewrite is no further from the fp64 forward than the tower itself is (16 random
    # blocks amplify fp32 rounding to ~1e-3 of the map's scale in both)
    for key in ("last_hidden_state", "pooler_output"):
        tower_error = (expected[key] - exact[key]).abs().max().item()
        assert (actual[key] - exact[key]).abs().max().item() <= 2 * tower_error + 1e-6
        assert_close(actual[key], expected[key], rtol=5e-3)
    assert all(torch.equal(tensor, before[name]) for name, tensor in tower.state_dict().items())  # a copy
    assert any(isinstance(module, nn.BatchNorm2d) for module in tower.modules())
