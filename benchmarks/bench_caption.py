"""Captioning throughput: the course's greedy loop against `generate()`, full-size model, random weights.

    python benchmarks/bench_caption.py --images 16 --new-tokens 20     # all variants, each in its own process

course (baseline): one image at a time; for every new token run CLIP on the pixels again, the adapter, and
    Qwen3 over the whole sequence without a KV cache (logits at every position), then argmax.
ours_batched: `model.generate(**processor(images=batch), do_sample=False)`, batch 16, KV cache.
ours_bs1: the same, one image at a time.
Every variant decodes the JPEGs and preprocesses inside the timed region, produces exactly --new-tokens
tokens (end-of-text and <|image_pad|> suppressed in all variants, since a random-weight model could emit
them), and the token ids of every variant are compared with the course loop's: greedy is deterministic, so
they must be the same.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    add_common_arguments,
    autocast,
    PeakMemory,
    build_model,
    configure_threads,
    emit,
    environment,
    image_paths,
    load_average,
    log,
    pick_device,
    pick_dtype,
    processor_for,
    profiled,
    ratio,
    run_variant_subprocess,
    sync,
)
from processing_clipqwen import to_rgb  # noqa: E402

VARIANTS = ("course", "ours_batched", "ours_bs1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images captioned by the ours variants")
    parser.add_argument("--course-images", type=int, default=None,
                        help="images captioned by the course loop (default --images); rates are per caption")
    parser.add_argument("--bs1-images", type=int, default=None, help="images for ours_bs1 (default --images)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="ours_batched")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (0 or 1)")
    parser.add_argument("--static-cache", action="store_true", help="ours: cache_implementation='static'")
    parser.add_argument("--compile", action="store_true",
                        help="ours, with --static-cache on CUDA: let generate() torch.compile the decoding step")
    add_common_arguments(parser, VARIANTS)
    return parser.parse_args(argv)



def suppressed_ids(model):
    # A random-weight model may emit end-of-text (= pad) or the image placeholder; forbid both everywhere so
    # that every variant produces exactly --new-tokens tokens.
    return sorted({model.config.text_config.eos_token_id, model.config.image_token_id})


# ---- the course loop -----------------------------------------------------------------------------------------
@torch.no_grad()
def course_caption(model, image_processor, path, new_tokens, suppress, device, dtype):
    pixel_values = image_processor([to_rgb(Image.open(path))], return_tensors="pt")["pixel_values"].to(device, dtype)
    embed = model.language_model.get_input_embeddings()
    generated = []
    for _ in range(new_tokens):
        with autocast(device, dtype):
            image_embeds = model.vision_model(pixel_values=pixel_values).image_embeds  # CLIP again, every token
            prefix = model.adapter(image_embeds.to(model.adapter.layers[0].weight.dtype)).to(embed.weight.dtype)
            token_embeds = embed(torch.tensor([generated], dtype=torch.long, device=device))
            inputs_embeds = torch.cat([prefix, token_embeds], dim=1)
            # the whole sequence again, no KV cache, logits at every position
            logits = model.language_model(inputs_embeds=inputs_embeds, use_cache=False).logits
        next_logits = logits[0, -1].float()
        next_logits[suppress] = float("-inf")
        generated.append(int(next_logits.argmax()))
    return generated


def run_course(args, model, processor, paths, device, dtype):
    suppress = suppressed_ids(model)
    if args.warmup:
        course_caption(model, processor.image_processor, paths[0], 2, suppress, device, dtype)
    sync(device)
    start = time.perf_counter()
    with profiled(args.profile):
        captions = [course_caption(model, processor.image_processor, path, args.new_tokens, suppress, device, dtype)
                    for path in paths]
        sync(device)
    return captions, time.perf_counter() - start


# ---- ours ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ours_generate(model, processor, paths, args, device, dtype):
    inputs = processor(images=[Image.open(path) for path in paths]).to(device)
    with autocast(device, dtype):
        out = model.generate(
            **inputs,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            suppress_tokens=suppressed_ids(model),
            cache_implementation="static" if args.static_cache else None,
            disable_compile=not args.compile,
        )
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def run_ours(args, model, processor, paths, device, dtype, batch_size):
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if args.warmup:  # same shapes as the timed calls, so that a compiled step is compiled before timing
        ours_generate(model, processor, batches[0], args, device, dtype)
    sync(device)
    start = time.perf_counter()
    with profiled(args.profile):
        captions = [tokens for batch in batches
                    for tokens in ours_generate(model, processor, batch, args, device, dtype)]
        sync(device)
    return captions, time.perf_counter() - start


def run_one(args, device, dtype):
    model = build_model(device, dtype, tiny=args.tiny).eval()
    processor = processor_for(model)
    count = {"course": args.course_images, "ours_bs1": args.bs1_images}.get(args.only) or args.images
    paths = image_paths(count)
    with PeakMemory(device) as memory:
        if args.only == "course":
            captions, seconds = run_course(args, model, processor, paths, device, dtype)
        else:
            batch_size = args.batch_size if args.only == "ours_batched" else 1
            captions, seconds = run_ours(args, model, processor, paths, device, dtype, batch_size)
    lengths = sorted({len(c) for c in captions})
    log(f"{args.only}: {len(captions)} captions × {lengths} tokens in {seconds:.2f} s")
    return {
        "variant": args.only,
        "images": len(captions),
        "batch_size": {"course": 1, "ours_bs1": 1}.get(args.only, args.batch_size),
        "new_tokens": args.new_tokens,
        "seconds": seconds,
        "captions_per_s": len(captions) / seconds,
        "new_tokens_per_s": sum(len(c) for c in captions) / seconds,
        "static_cache": args.static_cache if args.only != "course" else None,
        "compile": args.compile if args.only != "course" else None,
        "tokens": captions,
        **memory.report(),
    }


def same_tokens(candidate, reference):
    n = min(len(candidate["tokens"]), len(reference["tokens"]))
    identical = sum(a == b for a, b in zip(candidate["tokens"][:n], reference["tokens"][:n]))
    return {"compared": n, "identical": identical, "all_identical": identical == n}


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    configure_threads(args.threads)
    if args.only:
        load_before = load_average()
        result = run_one(args, device, dtype)
        result["threads"] = torch.get_num_threads()
        result["load_average_1min"] = [load_before, load_average()]
        emit(result)
        return

    argv = list(argv if argv is not None else sys.argv[1:])
    variants = [v for v in args.variants.split(",") if v]
    results = {v: run_variant_subprocess(Path(__file__), v, argv) for v in variants}
    summary = {"benchmark": "caption", **environment(device), "dtype": str(dtype).replace("torch.", ""),
               "threads": torch.get_num_threads() if device.type == "cpu" else None, **results}
    course = results.get("course")
    if course:
        summary["same_tokens_as_course"] = {v: same_tokens(r, course) for v, r in results.items() if v != "course"}
        summary["ratios_over_course"] = {
            v: {"captions_per_s": ratio(r["captions_per_s"], course["captions_per_s"]),
                "peak_memory": ratio(r["peak_memory_gib"], course["peak_memory_gib"], 3)}
            for v, r in results.items() if v != "course"
        }
        if "ours_batched" in results:
            ours = results["ours_batched"]
            summary["targets"] = {
                "batched_at_least_20x": summary["ratios_over_course"]["ours_batched"]["captions_per_s"] >= 20,
                "peak_memory_not_higher": ours["peak_memory_gib"] <= course["peak_memory_gib"],
            }
    for r in results.values():  # token ids were only needed for the comparison; keep the JSON readable
        r["tokens_first_caption"] = r.pop("tokens")[0]
    emit(summary)


if __name__ == "__main__":
    main()
