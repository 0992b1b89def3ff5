"""clipqwen-caption: caption image files, folders or globs with a trained model.

    clipqwen-caption MODEL photos/ "more/*.png" --num_beams 3 --output captions.jsonl

MODEL is a clipqwen folder or Hub id (pinned with --revision). Unreadable files are reported and skipped;
the others are captioned in batches, with a progress bar.
"""

import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .images import ImageLoadError, load_image
from .loading import load_clipqwen

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders → their image files (sorted); anything else is treated as a glob pattern."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise SystemExit(f"{item}: no such file, folder or matching glob.")
            paths += matches
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="clipqwen-caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="clipqwen model folder or Hub id")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--revision", default=None, help="Hub revision (commit sha) to pin")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--prompt", default="", help="text after the image, before the caption")
    parser.add_argument("--output", help="write JSONL here (one {file, caption} per line) instead of printing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise SystemExit("No image files found.")
    model, processor = load_clipqwen(args.model, revision=args.revision, device=args.device)
    generation = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample)
    if args.do_sample:
        generation.update(temperature=args.temperature, top_p=args.top_p)

    out = open(args.output, "w", encoding="utf-8") if args.output else None
    skipped = 0
    try:
        for start in tqdm(range(0, len(paths), args.batch_size), desc="captioning", unit="batch", file=sys.stderr):
            images, names = [], []
            for path in paths[start : start + args.batch_size]:
                try:
                    images.append(load_image(path))
                    names.append(str(path))
                except ImageLoadError as error:
                    skipped += 1
                    print(f"skipped: {error}", file=sys.stderr)
            if not images:
                continue
            inputs = processor(images=images, text=[args.prompt] * len(images)).to(args.device)
            with torch.no_grad():
                ids = model.generate(**inputs, **generation)
            for name, caption in zip(names, processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])):
                if out:
                    out.write(json.dumps({"file": name, "caption": caption}, ensure_ascii=False) + "\n")
                    out.flush()  # a crash later keeps every caption written so far
                else:
                    print(f"{name}\t{caption}")
    finally:
        if out:
            out.close()
    if skipped:
        print(f"{skipped} unreadable file(s) skipped.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
