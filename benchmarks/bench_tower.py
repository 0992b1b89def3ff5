#!/usr/bin/env python
"""The feature pass's image tower: EfficientNet-Lite0 at 224 px as the cache ran it before (the stock module, 64
images a batch, channels-first) against `clipqwen.backbones.fast_tower.for_inference` (BatchNorm folded, identity
squeeze-excite removed, channels-last, `CNN_CHUNK` images at a time), in fp32 and bf16, alternating rounds.

    python benchmarks/bench_tower.py [--images 256] [--rounds 3]

Weights: the converted ImageNet Lite0 folder where `python -m clipqwen.backbones efficientnet-lite0 DIR` made one
($HF_HOME/clipqwen/converted/efficientnet-lite0, as scripts/flickr8k.sh does), else random weights of the same
shape (the speed does not depend on them). Prints images/s per variant (median of the rounds), the ratio to the
old path in the same dtype, and the largest difference of the new path's 7×7 map from the old one's.
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import EfficientNetModel  # noqa: E402

from clipqwen.backbones.efficientnet_lite import lite0_config  # noqa: E402
from clipqwen.backbones.fast_tower import CNN_CHUNK, for_inference  # noqa: E402
from clipqwen.hub import clipqwen_cache_dir  # noqa: E402


def lite0() -> tuple[EfficientNetModel, str]:
    folder = clipqwen_cache_dir() / "converted" / "efficientnet-lite0"
    if (folder / "config.json").exists():
        return EfficientNetModel.from_pretrained(folder).eval(), f"ImageNet weights ({folder})"
    return EfficientNetModel(lite0_config()).eval(), "random weights"


@torch.no_grad()
def images_per_second(tower, pixels: torch.Tensor, chunk: int) -> float:
    start = time.perf_counter()
    for part in pixels.split(chunk):
        tower(pixel_values=part)
    return len(pixels) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tower, weights = lite0()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"EfficientNet-Lite0, {weights}; {args.images} images of 224 px, {args.rounds} alternating rounds")
    pixels = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        old = tower.to(dtype)
        new = for_inference(old)
        batch = pixels.to(dtype)
        runs = {"old (batch 64, channels-first)": (old, 64), f"new (batch {CNN_CHUNK}, folded)": (new, CNN_CHUNK)}
        images_per_second(old, batch[:16], 8), images_per_second(new, batch[:16], 8)  # warm-up
        rates = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (module, chunk) in runs.items():
                rates[name].append(images_per_second(module, batch, chunk))
        with torch.no_grad():
            reference = old(pixel_values=batch[:8]).last_hidden_state.float()
            difference = (new(pixel_values=batch[:8]).last_hidden_state.float() - reference).abs().max().item()
        base = statistics.median(next(iter(rates.values())))
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"{str(dtype).removeprefix('torch.'):>9} {name:<32} {median:7.1f} images/s  {median / base:5.2f}x")
        print(f"{'':>9} largest difference of the new map: {difference:.2e} (map max {reference.abs().max():.2f})")


if __name__ == "__main__":
    main()
