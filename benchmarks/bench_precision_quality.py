"""Caption quality of a TRAINED model in fp32, bf16 and int8 weight-only: the same greedy captions of the embedded
test split (the decoding saved with the model), scored with clipqwen.caption_metrics, and each precision's tokens
compared with the first's (default: fp32 with plain weights, the reference path). `PRECISION:plain` loads without
the CPU's prepacked decoder weights (clipqwen.inference.packed_linear), which every front door uses by default.
Random-weight benchmarks cannot say this: their greedy tokens drift for reasons a trained model may not have.

    python run_captioning.py configs/embedded-tiny.json --output_dir outputs/embedded-fp32   # the trained model
    python benchmarks/bench_precision_quality.py outputs/embedded-fp32
    python benchmarks/bench_precision_quality.py outputs/flickr8k --photos ../shared/data/flickr8k --limit 250

The model loads through clipqwen.inference.loading with `precision=` exactly as clipqwen-caption and app.py load it.
"""

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset, Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    configure_threads,
    emit,
    environment,
    log,
    pick_device,
    write_results,
)
from clipqwen.caption_metrics import compute_caption_metrics  # noqa: E402
from clipqwen.data.embedded import load_embedded_dataset  # noqa: E402
from clipqwen.inference.loading import load_clipqwen  # noqa: E402
from clipqwen.inference.packed_linear import decoding_path  # noqa: E402
from clipqwen.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained clipqwen folder (the embedded main job's output)")
    parser.add_argument(
        "--precisions",
        default=",".join(["fp32:plain", *PRECISIONS, "bf16:plain"]),
        help="comma-separated, the reference first; PRECISION:plain = without prepacked weights",
    )
    parser.add_argument(
        "--photos",
        help="a folder of Flickr30K-layout parquet shards (image, caption, split): its val photos instead of the "
        "embedded test split",
    )
    parser.add_argument("--limit", type=int, default=250, help="with --photos: the first N val photos")
    parser.add_argument("--batch-size", type=int, default=60, help="the main job's per_device_eval_batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default=str(RESULTS), help="merge the figures into this JSON file ('' = no)")
    return parser.parse_args(argv)


@torch.no_grad()
def caption_split(model, processor, split, batch_size: int, device: str) -> tuple[list[list[int]], list[str]]:
    tokens, captions = [], []
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        inputs = processor(images=rows["image"]).to(device)
        ids = model.generate(**inputs)[:, inputs["input_ids"].shape[1] :]  # the generation_config saved with it
        captions += processor.batch_decode(ids)
        eos = model.generation_config.eos_token_id
        tokens += [[t for t in row if t != eos] for row in ids.tolist()]  # padding after the end is not a token
    return tokens, captions


def agreement(candidate: list[list[int]], reference: list[list[int]]) -> dict:
    """Identical captions, and the share of reference tokens before a caption first differs from the reference."""
    prefix = [
        next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        for c, r in zip(candidate, reference)
    ]
    return {
        "identical_captions": sum(c == r for c, r in zip(candidate, reference)),
        "captions": len(reference),
        "agreeing_token_share": round(sum(prefix) / max(1, sum(map(len, reference))), 4),
    }


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    configure_threads(args.threads)
    test = val_photos(args.photos, args.limit) if args.photos else load_embedded_dataset()["test"]
    references = test["captions"]
    figures, tokens_of = {}, {}
    for variant in [p for p in args.precisions.split(",") if p]:
        precision, _, plain = variant.partition(":")
        model, processor = load_clipqwen(args.model, device=str(device), precision=precision, pack_weights=not plain)
        start = time.perf_counter()
        tokens, captions = caption_split(model, processor, test, args.batch_size, str(device))
        seconds = time.perf_counter() - start
        scores = compute_caption_metrics(captions, references)
        tokens_of[variant] = tokens
        reference_tokens = next(iter(tokens_of.values()))  # the first variant (fp32, plain weights) is the reference
        figures[variant] = {
            "path": decoding_path(model),
            "seconds": round(seconds, 2),
            **{k: round(v, 4) for k, v in scores.items()},
            "vs_first": agreement(tokens, reference_tokens),
            "first_captions": captions[:3],
        }
        log(
            f"{variant}: {scores} in {seconds:.1f} s; vs {args.precisions.split(',')[0]}: "
            f"{figures[variant]['vs_first']}"
        )
        del model
    for variant in figures:  # prepacked weights against the plain ones in the same precision
        if f"{variant}:plain" in tokens_of:
            figures[variant]["vs_plain"] = agreement(tokens_of[variant], tokens_of[f"{variant}:plain"])
    first = next(iter(figures.values()))
    differences = {
        p: {k: round(f[k] - first[k], 4) for k in first if isinstance(first[k], float) and k != "seconds"}
        for p, f in figures.items()
        if f is not first
    }
    summary = {
        "benchmark": "trained_model_precision",
        **environment(device),
        "model": args.model,
        "test_images": len(test),
        "decoding": model_decoding(args.model),
        "precisions": figures,
        "metric_differences_vs_first": differences,
    }
    if args.results:
        headline = {
            "trained_model_precision_vs_fp32": {
                p: {"metric_differences": differences[p], **figures[p]["vs_first"]} for p in differences
            }
        }
        write_results("trained_model_precision", summary, headline, environment(device), Path(args.results))
    emit(summary)


def val_photos(folder: str, limit: int) -> Dataset:
    """The first `limit` val rows of the parquet shards in `folder`, as the embedded split's columns."""
    rows = Dataset.from_parquet([str(f) for f in sorted(Path(folder).glob("*.parquet"))]).filter(
        lambda split: split == "val", input_columns="split"
    )
    rows = rows.select(range(min(limit, len(rows)))).cast_column("image", Image())
    return rows.rename_column("caption", "captions")


def model_decoding(folder: str) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(folder)
    return {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample}


if __name__ == "__main__":
    main()
