"""Save a clipqwen model with random weights, full size by default (CLIP ViT-B/32 + Qwen3-0.6B-Base shapes), with
the bundled processor, so that `run_captioning.py --model_name_or_path FOLDER` runs the main job at full size on a
machine that cannot reach the Hub (benchmarks/run_gpu.sh: phase timings and the feature-cache build).

    python benchmarks/make_random_model.py /tmp/clipqwen-full-random [--tiny]
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from clipqwen.presets import LAYOUTS, layout_config  # noqa: E402
from clipqwen.tiny import bundled_processor, tiny_config  # noqa: E402
from configuration_clipqwen import ClipQwenConfig  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder to write (save_pretrained layout)")
    parser.add_argument("--tiny", action="store_true", help="the test preset instead (a smoke test)")
    parser.add_argument("--preset", choices=sorted(LAYOUTS), default="clipcap", help="run_captioning.py's layouts")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    settings = layout_config(args.preset)
    config = tiny_config(**settings) if args.tiny else ClipQwenConfig(**settings)
    model = ClipQwenForConditionalGeneration(config)
    model.save_pretrained(args.output)
    processor = bundled_processor(num_image_tokens=config.num_image_tokens, prompt=LAYOUTS[args.preset]["prompt"])
    processor.save_pretrained(args.output)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters saved to {args.output}")


if __name__ == "__main__":
    main()
