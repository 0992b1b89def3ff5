"""clipqwen-caption: caption image files, folders or globs with a trained model.

    clipqwen-caption MODEL photos/ "more/*.png" --num_beams 3 --output captions.jsonl

MODEL is a clipqwen folder or Hub id (pinned with --revision). Captions are decoded as the model's
generation_config.json says; a decoding flag overrides that one setting. Unreadable files are
reported and skipped; each batch is written as soon as it is done. Errors are one line on stderr:
exit status 2 for a wrong argument or input, 1 when loading or captioning fails.
"""

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import hub
from ..images import IMAGE_SUFFIXES, image_files_in, name_problem, printable
from ..precision import PrecisionError
from ..training.preflight import MAX_NEW_TOKENS, MAX_NUM_BEAMS  # the bounds run_captioning checks too
from . import captioning
from .captioning import CAPTION_GENERATION
from .loading import ModelLoadError, one_line
from .packed_linear import decoding_path


MAX_BATCH_SIZE = 1024  # images decoded and held at once; beyond it a typo is likelier than intent


class InputError(ValueError):
    """A wrong argument or input: exit status 2, like argparse's own errors."""


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders → their image files (sorted); anything else is treated as a glob pattern."""
    paths = []
    for item in inputs:
        path = Path(item)
        if problem := name_problem(path):  # asking whether it is a folder would raise
            raise InputError(f"{printable(item)}: {problem}.")
        if path.is_dir():
            images, passed = image_files_in(path)  # load_image says why an image name is no image file
            paths += images
            if passed:
                print(
                    f"{printable(item)}: passed over {len(passed)} file(s) not named as images: "
                    f"{', '.join(map(printable, passed[:5]))}{' ...' if len(passed) > 5 else ''}",
                    file=sys.stderr,
                )
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise InputError(f"{printable(item)} is not a regular file (a fifo, socket or device?): give image files.")
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if "**" in item:  # "**" follows symlinks: a link to a parent repeats every photo
                shortest = {}
                for match in sorted(matches, key=lambda match: len(match.parts)):
                    shortest.setdefault(os.path.realpath(match), match)
                matches = sorted(shortest.values())
            if not matches:
                raise InputError(f"{printable(item)}: no such file, folder or matching glob.")
            paths += matches
    if not paths:
        raise InputError(
            f"No image files in {', '.join(map(printable, inputs))} (looked for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} in folders)."
        )
    return paths


def check_output(output: str, paths: list[Path]) -> None:
    """Refuse an --output that cannot be written, before the model loads, or that is one of the
    photos (by any name or link): opening it would empty the photo before it is read."""
    if os.path.isdir(output) or not os.path.isdir(os.path.dirname(output) or "."):
        raise InputError(f"--output {printable(output)}: not a file in an existing folder.")
    if not os.path.exists(output):
        return
    target = os.stat(output)
    for path in paths:
        if os.path.samestat(os.stat(path), target):
            raise InputError(
                f"--output {printable(output)} is one of the input images ({printable(str(path))}); "
                "writing it would erase it. Choose another output file."
            )


def jsonl_line(record: dict) -> str:
    """One JSON line, valid UTF-8 whatever the file names: undecodable bytes (lone surrogates after
    os.fsdecode) become \\udcXX escapes that json.loads + os.fsencode undo; the rest stays plain."""
    line = json.dumps(record, ensure_ascii=False)
    return re.sub("[\ud800-\udfff]", lambda match: f"\\u{ord(match.group()):04x}", line)


def in_range(kind, low, high, allowed: str):
    """An argparse type that refuses values outside [low, high] at parse time; argparse names the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}: use {allowed}") from None
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {allowed}")
        return value

    return parse


def device(text: str) -> str:
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:1, ...") from None
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line; `--help` prints the usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="clipqwen-caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="clipqwen model folder or Hub id")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--revision", default=None, help="Hub revision (commit sha) to pin")
    parser.add_argument("--batch_size", type=in_range(int, 1, MAX_BATCH_SIZE, f"1 to {MAX_BATCH_SIZE}"), default=16)
    fallback = ", ".join(f"{name}={value}" for name, value in CAPTION_GENERATION.items())
    decoding = parser.add_argument_group(
        "decoding",
        "Each defaults to the model's generation_config.json (the decoding its scores were measured with);\n"
        f"where that says nothing, to {fallback}.\nA flag given overrides that one setting.",
    )
    decoding.add_argument("--num_beams", type=in_range(int, 1, MAX_NUM_BEAMS, f"1 to {MAX_NUM_BEAMS}"))
    decoding.add_argument("--max_new_tokens", type=in_range(int, 1, MAX_NEW_TOKENS, f"1 to {MAX_NEW_TOKENS}"))
    decoding.add_argument(
        "--do_sample",
        action=argparse.BooleanOptionalAction,
        help="sample (with one beam unless --num_beams says otherwise), or not (--no-do_sample)",
    )
    decoding.add_argument("--temperature", type=in_range(float, 1e-3, 100.0, "0.001 to 100"), help="when sampling")
    decoding.add_argument("--top_p", type=in_range(float, 1e-3, 1.0, "0.001 to 1"), help="when sampling")
    parser.add_argument("--prompt", default="", help="text after the image, before the caption")
    parser.add_argument("--output", help="write JSONL here (one {file, caption} per line) instead of printing")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    captioning.add_precision_argument(parser)
    return parser.parse_args(argv)


def caption_files(args) -> int:
    paths = expand_inputs(args.inputs)
    if args.output:
        check_output(args.output, paths)
    offline = hub.hub_out_of_reach([args.model])  # an unreachable Hub fails now, not after retries
    model, processor = captioning.load(
        args.model, args.revision, device=args.device, precision=args.precision, local_files_only=offline
    )
    print(f"clipqwen-caption: captioning on {args.device} in {decoding_path(model)}", file=sys.stderr)
    flags = {name: getattr(args, name) for name in captioning.DECODING}  # None: not given
    generation = captioning.generation_config(model.generation_config, **flags)

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    skipped = 0
    try:
        for start in tqdm(range(0, len(paths), args.batch_size), desc="captioning", unit="batch", file=sys.stderr):
            images, read, problems = captioning.read_images(paths[start : start + args.batch_size])
            for problem in problems:
                tqdm.write(f"skipped: {problem}", file=sys.stderr)  # above the progress bar, not inside it
            skipped += len(problems)
            if not images:
                continue
            captions = captioning.caption_images(model, processor, images, generation, args.prompt)
            for name, caption in zip(map(str, read), captions):
                if args.output:
                    out.write(jsonl_line({"file": name, "caption": caption}) + "\n")
                else:
                    out.write(f"{printable(name)}\t{caption}\n")
            out.flush()  # a crash later keeps every batch written so far
    finally:
        if args.output:
            out.close()
    if skipped == len(paths):
        raise InputError(f"none of the {len(paths)} file(s) could be read as an image (see above).")
    if skipped:
        print(f"{skipped} unreadable file(s) skipped.", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)  # argparse reports its own errors (exit status 2)
    try:
        return caption_files(args)
    except (InputError, PrecisionError) as error:
        print(f"clipqwen-caption: error: {error}", file=sys.stderr)
        return 2
    except (ModelLoadError, OSError, RuntimeError) as error:  # RuntimeError: out of memory, a device problem, ...
        print(f"clipqwen-caption: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every finished batch is already written
        print("clipqwen-caption: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
