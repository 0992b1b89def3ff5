"""A frozen image tower rewritten for fast inference, for the feature pass that encodes every image once.

An EfficientNet in eval mode spends most of its CPU time outside its convolutions (docs/benchmarks.md):
BatchNorm and ReLU6 as separate passes over large activations, squeeze-excite layers that the Lite0
conversion made exact identities but that still pool and multiply, and channels-first layouts that oneDNN
reorders at every convolution. `for_inference` returns a copy with each BatchNorm folded into its
convolution (`torch.nn.utils.fusion`), identity squeeze-excite layers removed, in-place ReLU6 and
channels-last weights; the original tower is untouched. Outputs equal the original's to rounding (fp32).
A tower with no such layers (CLIP) is returned as it is.
"""

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers.models.efficientnet.modeling_efficientnet import EfficientNetSqueezeExciteLayer


# (convolution, BatchNorm) attribute pairs of transformers' EfficientNet modules, each BatchNorm right after
# its convolution in the module's forward.
CONV_BN_PAIRS = (
    ("convolution", "batchnorm"),  # stem
    ("expand_conv", "expand_bn"),
    ("depthwise_conv", "depthwise_norm"),
    ("project_conv", "project_bn"),
    ("top_conv", "top_bn"),
)

# Images a CNN tower takes at a time in the feature pass. The activations of 64 images at 224 px are far
# larger than the CPU's caches; 4-8 at a time ran 1.5-1.8x faster on a 2-core EPYC (docs/benchmarks.md).
# Batching does not change a tower's per-image arithmetic beyond rounding.
CNN_CHUNK = 8


def is_cnn(tower: nn.Module) -> bool:
    return any(isinstance(module, nn.BatchNorm2d) for module in tower.modules())


def _is_identity(layer: EfficientNetSqueezeExciteLayer) -> bool:
    """A squeeze-excite that multiplies by exactly 1.0: zero expand weights, sigmoid(bias) == 1 in its dtype."""
    expand = layer.expand
    return bool(torch.all(expand.weight == 0) and torch.all(torch.sigmoid(expand.bias) == 1))


@torch.no_grad()
def for_inference(tower: nn.Module) -> nn.Module:
    """A copy of `tower` in eval mode with its BatchNorms folded and identity squeeze-excite layers removed,
    channels-last; `tower` itself if it has no BatchNorm (nothing to gain)."""
    if not is_cnn(tower):
        return tower
    fast = copy.deepcopy(tower).eval()
    for module in list(fast.modules()):
        for conv_name, bn_name in CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        for name, child in module.named_children():
            if isinstance(child, EfficientNetSqueezeExciteLayer) and _is_identity(child):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.ReLU6):
                child.inplace = True  # its input is a fresh convolution output, read by nothing else
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)
