"""Captioning throughput and latency: the course's greedy loop against `generate()`, full-size model, random weights.

    python benchmarks/bench_caption.py --threads 1 --course-images 4 --bs1-images 4   # 2 alternating rounds

course (baseline), in the course's own dtypes (CLIP and the projector fp32, Qwen3 bf16): one image at a time; for
    every new token run CLIP on the pixels again, the projector, and Qwen3 over the whole sequence without a KV
    cache (logits at every position), then argmax. course_fp32 (an extra row): the same with fp32 weights.
ours_batched: `model.generate(...)`, batch 16, KV cache, in clipqwen's default precision on this machine
    (clipqwen.precision); CLIP encodes the batch in chunks of --vision-chunk images and generate() gets their
    `vision_embeds`, so that CLIP's activations for all 16 images are never held at once.
ours_bs1: the same, one image at a time (the latency a person waits for), against its floor: the tower's weights
    once and the decoder's once per new token, read at the bandwidth measured in the same process.
*_bf16, *_int8: the same in bf16, or with the decoder's linears int8 weight-only (optimum-quanto).
Ours on a CPU runs as the CLI does: the decoder's fp32 / bf16 weights prepacked for oneDNN
(clipqwen.inference.packed_linear); *_plain: without that, the reference path.
Every variant runs the course's layout (--preset seed_exact: one image token, first), so that token ids compare
across variants; the default layout's 8 image tokens and prompt lengthen the prompt by 9 positions, once per caption.
Every variant decodes the JPEGs and preprocesses inside the timed region and produces exactly --new-tokens tokens
(end-of-text and <|image_pad|> suppressed in all variants, since a random-weight model could emit them). Token ids
are compared with the course loop's and with ours_bs1's: greedy is deterministic, so the same weights in the same
precision give the same tokens; across precisions rounding makes them drift, which the comparison counts.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PeakMemory,
    add_common_arguments,
    autocast,
    build_model,
    caption_bytes,
    configure_threads,
    course_logits,
    emit,
    emit_variant,
    environment,
    headline_ratios,
    image_paths,
    load_average,
    log,
    measure_variants,
    median,
    per_round_ratios,
    pick_device,
    processor_for,
    profiled,
    resolve_weights,
    results_path,
    stream_bandwidth,
    sync,
    write_results,
)
from clipqwen.inference.packed_linear import pack_decoder_linears  # noqa: E402
from processing_clipqwen import to_rgb  # noqa: E402


VARIANTS = (
    "course",
    "course_fp32",
    "ours_batched",
    "ours_batched_bf16",
    "ours_bs1",
    "ours_bs1_bf16",
    "ours_bs1_int8",
    "ours_bs1_plain",
    "ours_bs1_bf16_plain",
)
DEFAULT_VARIANTS = ("course", "ours_batched", "ours_batched_bf16", "ours_bs1", "ours_bs1_bf16", "ours_bs1_int8")
MEDIAN_KEYS = (
    "seconds",
    "captions_per_s",
    "new_tokens_per_s",
    "seconds_per_caption",
    "peak_memory_gib",
    "read_gb_s",
    "floor_seconds_per_caption",
    "ratio_to_floor",
)


def weights_of(variant: str) -> str:
    if variant == "course":
        return "course"
    suffix = variant.removesuffix("_plain").rsplit("_", 1)[-1]
    return suffix if suffix in ("fp32", "bf16", "int8") else "default"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images captioned by the ours variants")
    parser.add_argument(
        "--course-images",
        type=int,
        default=None,
        help="images captioned by the course loop (default --images); rates are per caption",
    )
    parser.add_argument("--bs1-images", type=int, default=None, help="images for ours_bs1 (default --images)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="ours_batched")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (0 or 1)")
    parser.add_argument("--static-cache", action="store_true", help="ours: cache_implementation='static'")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ours, with --static-cache on CUDA: let generate() torch.compile the decoding step",
    )
    parser.add_argument(
        "--vision-chunk",
        type=int,
        default=4,
        help="ours: CLIP encodes this many images at a time "
        "and generate() gets vision_embeds (0: pass the pixels of the whole batch to generate())",
    )
    add_common_arguments(parser, VARIANTS, DEFAULT_VARIANTS)
    return parser.parse_args(argv)


def suppressed_ids(model):
    # A random-weight model may emit end-of-text (= pad) or the image placeholder; forbid both everywhere so
    # that every variant produces exactly --new-tokens tokens.
    return sorted({model.config.text_config.eos_token_id, model.config.image_token_id})


# ---- the course loop -----------------------------------------------------------------------------------------
@torch.no_grad()
def course_caption(model, image_processor, path, new_tokens, suppress, device):
    pixel_values = image_processor([to_rgb(Image.open(path))], return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(device, model.model.vision_tower.dtype)
    embed = model.get_input_embeddings()
    generated = []
    for _ in range(new_tokens):
        with contextlib.nullcontext():  # no autocast: the weights' own dtypes, as the course runs them
            image_embeds = model.model.vision_tower(pixel_values=pixel_values).image_embeds  # CLIP again, every token
            prefix = model.model.multi_modal_projector(image_embeds).to(embed.weight.dtype)
            token_embeds = embed(torch.tensor([generated], dtype=torch.long, device=device))
            inputs_embeds = torch.cat([prefix, token_embeds], dim=1)
            # the whole sequence again, no KV cache, logits at every position
            logits = course_logits(model, inputs_embeds)
        next_logits = logits[0, -1].float()
        next_logits[suppress] = float("-inf")
        generated.append(int(next_logits.argmax()))
    return generated


def run_course(args, model, processor, paths, device, weights):
    suppress = suppressed_ids(model)
    if args.warmup:
        course_caption(model, processor.image_processor, paths[0], 2, suppress, device)
    sync(device)
    start = time.perf_counter()
    with profiled(args.profile):
        captions = [
            course_caption(model, processor.image_processor, path, args.new_tokens, suppress, device) for path in paths
        ]
        sync(device)
    return captions, time.perf_counter() - start


# ---- ours ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ours_generate(model, processor, paths, args, device, weights):
    chunk = args.vision_chunk or len(paths)
    if chunk >= len(paths):
        inputs = processor(images=[Image.open(path) for path in paths]).to(device)
    else:  # CLIP a few images at a time; only their features (not CLIP's activations for all) are kept
        parts, features = [], []
        for start in range(0, len(paths), chunk):
            part = processor(images=[Image.open(path) for path in paths[start : start + chunk]]).to(device)
            with autocast(device, weights):
                features.append(model.get_vision_embeds(part.pop("pixel_values")))
            parts.append(part)
        # prompts without text are all the same length: no re-padding needed
        inputs = {key: torch.cat([part[key] for part in parts]) for key in parts[0].keys()}
        inputs["vision_embeds"] = torch.cat(features)
    with autocast(device, weights):
        out = model.generate(
            **inputs,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            suppress_tokens=suppressed_ids(model),
            cache_implementation="static" if args.static_cache else None,
            disable_compile=not args.compile,
        )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def run_ours(args, model, processor, paths, device, weights, batch_size):
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if args.warmup:  # same shapes as the timed calls, so that a compiled step is compiled before timing
        ours_generate(model, processor, batches[0], args, device, weights)
    sync(device)
    start = time.perf_counter()
    with profiled(args.profile):
        captions = [
            tokens for batch in batches for tokens in ours_generate(model, processor, batch, args, device, weights)
        ]
        sync(device)
    return captions, time.perf_counter() - start


def run_one(args, device, weights):
    model = build_model(device, weights, "seed_exact", tiny=args.tiny).eval()
    processor = processor_for(model, "seed_exact")
    course, bs1 = args.only.startswith("course"), args.only.startswith("ours_bs1")
    if not course and not args.only.endswith("_plain"):
        pack_decoder_linears(model)  # what clipqwen-caption and the demo run (on a CPU that gains from it)
    count = (args.course_images if course else args.bs1_images if bs1 else None) or args.images
    paths = image_paths(count)
    batch_size = 1 if course or bs1 else args.batch_size
    with PeakMemory(device) as memory:
        if course:
            captions, seconds = run_course(args, model, processor, paths, device, weights)
        else:
            captions, seconds = run_ours(args, model, processor, paths, device, weights, batch_size)
    lengths = sorted({len(c) for c in captions})
    log(f"{args.only}: {len(captions)} captions × {lengths} tokens in {seconds:.2f} s")
    at_floor = floor(model, args, seconds / len(captions)) if bs1 and device.type == "cpu" else {}
    return at_floor | {
        "variant": args.only,
        "images": len(captions),
        "batch_size": batch_size,
        "weights": weights,
        "new_tokens": args.new_tokens,
        "seconds": seconds,
        "seconds_per_caption": seconds / len(captions),
        "captions_per_s": len(captions) / seconds,
        "new_tokens_per_s": sum(len(c) for c in captions) / seconds,
        "static_cache": None if course else args.static_cache,
        "compile": None if course else args.compile,
        "vision_chunk": None if course or batch_size == 1 else args.vision_chunk,
        "tokens": captions,
        **memory.report(),
    }


def floor(model, args, seconds_per_caption: float) -> dict:
    """Batch 1 on a CPU: the tower's weights read once and the decoder's once per new token (prefill writes the
    first), at the read bandwidth measured here, and the caption's time as a multiple of it."""
    decoder, read = caption_bytes(model, args.new_tokens)
    bandwidth = stream_bandwidth()["read_gb_s_wall"]
    seconds = read / (bandwidth * 1e9)
    return {
        "decoder_gb_per_token": round(decoder / 1e9, 3),
        "read_gb_s": bandwidth,
        "floor_seconds_per_caption": round(seconds, 3),
        "ratio_to_floor": round(seconds_per_caption / seconds, 2),
    }


def same_tokens(candidate: list[list[int]], reference: list[list[int]]) -> dict:
    """Identical captions, and the share of new tokens before a caption first differs from the reference's."""
    pairs = list(zip(candidate, reference))
    prefix = [next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r))) for c, r in pairs]
    return {
        "compared": len(pairs),
        "identical": sum(c == r for c, r in pairs),
        "agreeing_token_share": round(sum(prefix) / max(1, sum(len(r) for _, r in pairs)), 3),
    }


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    configure_threads(args.threads)
    if args.only:
        load_before = load_average()
        emit_variant(run_one(args, device, resolve_weights(device, weights_of(args.only))), load_before)
        return

    runs, results, summary = measure_variants(Path(__file__), "caption", args, argv, device, MEDIAN_KEYS)
    variants = list(runs)
    summary |= results
    # greedy tokens of the first round (every round computes the same ones)
    for reference in ("course", "ours_bs1"):
        if reference in results:
            summary[f"same_tokens_as_{reference}"] = {
                v: same_tokens(r["tokens"], results[reference]["tokens"]) for v, r in results.items() if v != reference
            }
    # prepacked weights against the plain ones, in the same precision: the reference path's captions
    summary["same_tokens_packed_as_plain"] = {
        v.removesuffix("_plain"): same_tokens(results[v.removesuffix("_plain")]["tokens"], r["tokens"])
        for v, r in results.items()
        if v.endswith("_plain") and v.removesuffix("_plain") in results
    }
    ratios = {}
    for base in (b for b in ("course", "course_fp32") if b in runs):
        for v in (v for v in variants if v.startswith("ours")):
            speed, memory = (per_round_ratios(runs, v, base, key) for key in ("captions_per_s", "peak_memory_gib"))
            ratios[f"{v}/{base}"] = {
                "captions_per_s": median(speed),
                "peak_memory_gib": median(memory),
                "captions_per_s_rounds": speed,
                "peak_memory_gib_rounds": memory,
            }
    summary["ratios"] = ratios
    summary["targets"] = {
        name: {
            "captions_per_s_at_least_20x": r["captions_per_s"] >= 20,
            "peak_memory_at_most_1x": r["peak_memory_gib"] <= 1,
        }
        for name, r in ratios.items()
        if name.startswith("ours_batched") and name.endswith("/course")
    }
    headline = headline_ratios(ratios, "caption", "captions_per_s", default="ours_batched", bf16="ours_batched_bf16")
    if "ours_batched" in results:
        headline["caption_ours_precision"] = results["ours_batched"]["weights"]
    bs1 = {results[v]["weights"]: v for v in ("ours_bs1", "ours_bs1_bf16", "ours_bs1_int8") if v in results}
    if bs1:
        headline["latency_bs1_seconds"] = {
            weights: {
                "seconds_per_caption": results[v]["seconds_per_caption"],
                "ratio_to_floor": results[v].get("ratio_to_floor"),
                "new_tokens": args.new_tokens,
                **(
                    {"vs_ours_bs1": summary["same_tokens_as_ours_bs1"][v]}
                    if v != "ours_bs1" and "same_tokens_as_ours_bs1" in summary
                    else {}
                ),
            }
            for weights, v in bs1.items()
        }
    for r in results.values():  # token ids were only needed for the comparison; keep the JSON readable
        r["tokens_first_caption"] = r.pop("tokens")[0]
    path = results_path(args)
    if path and "course" in runs:
        keep = (
            "command",
            "torch",
            "rounds",
            "threads",
            "ratios",
            "targets",
            "same_tokens_as_course",
            "same_tokens_as_ours_bs1",
            "same_tokens_packed_as_plain",
        )
        figures = {key: summary[key] for key in keep if key in summary}
        write_results("caption", figures | results, headline, environment(device), path)
    emit(summary)


if __name__ == "__main__":
    main()
