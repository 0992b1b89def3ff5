"""Training throughput: the course pipeline against the clipqwen path, full-size model, random weights.

    python benchmarks/bench_train.py --threads 1   # every variant in its own process, 2 alternating rounds

course (baseline), per step, batch 4, in the course's own dtypes (CLIP and the projector fp32, Qwen3 bf16): open the
    JPEGs → CLIP image processor → CLIP forward → Linear(512, 1024) prefix → Qwen3 forward/backward over the
    captions padded to 128 tokens with logits (151,936-way) at every position and cross-entropy over them →
    AdamW on the projector. course_fp32 (an extra row): the same with every weight in fp32.
ours: the default layout (--preset clipcap: pooled 512-d → MLP → 8 image tokens after "Image:"), CLIP features
    computed once per image (a feature cache; its one-off cost is reported per image), then
    steps from `vision_embeds` with per-batch padding, logits only at the supervised positions (model.forward
    with labels), batch 32, in the precision run_captioning.py trains in by default on this machine (its
    choose_precision: bf16 on CUDA GPUs with bf16, fp32 on every CPU). ours_bf16: the same with bf16 frozen weights
    (the projector keeps fp32 master weights), as `--bf16 True --use_cpu True` trains on a CPU.
Both train the projector alone with frozen (requires_grad=False) CLIP and Qwen, read the same stream of
(photo, human caption) pairs and start from random weights of the same seed.

FLOPs per pair are analytic (benchmarks/common.py, docs/benchmarks.md): CLIP forward where it runs per step,
plus a frozen LM's forward and activation-gradient backward at the positions actually computed (padding
included), plus the projector. MFU = FLOPs/pair × pairs/s ÷ the chip's dense bf16 peak (CUDA only).
"""

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PeakMemory,
    add_common_arguments,
    autocast,
    build_model,
    clip_forward_flops,
    configure_threads,
    course_logits,
    emit,
    emit_variant,
    environment,
    frozen_lm_train_flops,
    headline_ratios,
    load_average,
    load_examples,
    log,
    measure_variants,
    median,
    pair_stream,
    peak_flops,
    per_round_ratios,
    pick_device,
    processor_for,
    profiled,
    projector_train_flops,
    resolve_weights,
    results_path,
    sync,
    write_results,
)
from clipqwen.images import load_image  # noqa: E402
from clipqwen.presets import DEFAULT_PRESET  # noqa: E402
from processing_clipqwen import to_rgb  # noqa: E402


VARIANTS = ("course", "course_fp32", "ours", "ours_bf16")
DEFAULT_VARIANTS = ("course", "ours", "ours_bf16")
WEIGHTS_OF = {"course": "course", "course_fp32": "fp32", "ours": "training", "ours_bf16": "bf16"}
MEDIAN_KEYS = (
    "pairs_per_s",
    "pairs_per_cpu_s",
    "caption_tokens_per_s",
    "peak_memory_gib",
    "achieved_tflops",
    "pairs_per_s_incl_cache_5_captions_per_image",
    "feature_cache_s_per_image",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="ours trains on steps × batch-size timed pairs "
        "(5 × 32 = 4 passes over the 40 photo-caption pairs); with --group-by-length the number of "
        "batches can differ",
    )
    parser.add_argument(
        "--course-steps",
        type=int,
        default=3,
        help="timed steps of the course pipeline (its "
        "cost does not depend on the captions: they are all padded to --course-max-length)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, each variant")
    parser.add_argument("--batch-size", type=int, default=32, help="ours: pairs per batch (at most)")
    parser.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: batch captions of similar length (sorted within the timed pairs)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=512,
        help="ours, with --group-by-length: at most "
        "this many padded positions per batch (0 = no limit); 512 ≈ the course's 4 × 129, which "
        "bounds activation memory to the course's",
    )
    parser.add_argument("--course-batch-size", type=int, default=4)
    parser.add_argument("--course-max-length", type=int, default=128, help="the course's fixed caption padding")
    parser.add_argument("--vision-feature-type", choices=("pooled", "patch"), default="pooled", help="ours")
    add_common_arguments(parser, VARIANTS, DEFAULT_VARIANTS)
    return parser.parse_args(argv)


def caption_token_counts(processor, captions):
    """Supervised tokens per caption as clipqwen counts them (caption + one end-of-text); used for both
    variants so that tokens/s compare the same work."""
    labels = processor(suffix=captions, padding=False, return_tensors=None)["labels"]
    return [sum(token != -100 for token in row) for row in labels]


# ---- the course pipeline -------------------------------------------------------------------------------------
def course_step(model, image_processor, tokenizer, pairs, optimizer, max_length, device):
    images = [to_rgb(Image.open(path)) for _, path, _ in pairs]  # JPEG decoded every step
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(device, tower.dtype)
    with torch.no_grad():
        image_embeds = tower(pixel_values=pixel_values).image_embeds  # CLIP every step
    with contextlib.nullcontext():  # no autocast: the weights' own dtypes, as the course calls its bf16 Qwen3
        prefix = projector(image_embeds)  # (B, 1, 1024)
        text = tokenizer(
            [caption + "<|endoftext|>" for _, _, caption in pairs],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        token_embeds = model.get_input_embeddings()(text["input_ids"])
        inputs_embeds = torch.cat([prefix.to(token_embeds.dtype), token_embeds], dim=1)
        attention_mask = torch.cat([text["attention_mask"].new_ones(len(pairs), 1), text["attention_mask"]], dim=1)
        labels = text["input_ids"].masked_fill(text["input_ids"] == tokenizer.pad_token_id, -100)  # the seed's way
        labels = torch.cat([labels.new_full((len(pairs), 1), -100), labels], dim=1)
        # Qwen3ForCausalLM with labels: logits at every one of the 129 positions, CE over the shifted labels.
        logits = course_logits(model, inputs_embeds, attention_mask)
        loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_course(args, device, weights):
    model = build_model(device, weights, "seed_exact", tiny=args.tiny).train()  # pooled 512-d → Linear → 1 token
    processor = processor_for(model, "seed_exact")
    optimizer = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-4)
    steps = args.course_steps
    bs = args.course_batch_size
    warm, timed = pair_stream(args.warmup * bs, seed=1), pair_stream(steps * bs)
    seq_len = 1 + args.course_max_length
    with PeakMemory(device) as memory:
        for step in range(args.warmup):
            course_step(
                model,
                processor.image_processor,
                processor.tokenizer,
                warm[step * bs : (step + 1) * bs],
                optimizer,
                args.course_max_length,
                device,
            )
        sync(device)
        step_times, cpu_times = [], []
        with profiled(args.profile):
            for step in range(steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = course_step(
                    model,
                    processor.image_processor,
                    processor.tokenizer,
                    timed[step * bs : (step + 1) * bs],
                    optimizer,
                    args.course_max_length,
                    device,
                )
                sync(device)
                step_times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                log(f"course step {step}: {step_times[-1]:.2f} s, loss {loss:.3f}")
    seconds = sum(step_times)
    # Its cost does not depend on the captions (all padded to 128), so its supervised tokens/s is taken at
    # the data set's mean caption length (one pass over the 40 pairs), which ours' 4 full passes also have.
    epoch = pair_stream(40)
    tokens_per_pair = sum(caption_token_counts(processor, [caption for _, _, caption in epoch])) / len(epoch)
    flops_per_pair = (
        clip_forward_flops(model.config.vision_config)
        + frozen_lm_train_flops(model.config.text_config, seq_len, seq_len)
        + projector_train_flops(model.model.multi_modal_projector, 1)
    )
    return {
        "variant": args.only,
        "batch_size": bs,
        "steps": steps,
        "pairs": len(timed),
        "sequence_length": seq_len,
        "logit_positions_per_pair": seq_len,
        "step_seconds": [round(t, 3) for t in step_times],
        "pairs_per_s": len(timed) / seconds,
        "pairs_per_cpu_s": len(timed) / sum(cpu_times),
        "caption_tokens_per_s": tokens_per_pair * len(timed) / seconds,
        "caption_tokens_per_pair": tokens_per_pair,
        "flops_per_pair": flops_per_pair,
        **memory.report(),
    }


# ---- ours ----------------------------------------------------------------------------------------------------
def build_feature_cache(model, processor, device, batch_size=32):
    """CLIP features of every photo, computed once: what a feature cache stores (frozen CLIP)."""
    paths = [path for path, _ in load_examples()]
    features = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):  # decoded and preprocessed as clipqwen.data's cache does it
            images = [load_image(path) for path in paths[i : i + batch_size]]
            features.append(model.get_vision_embeds(processor(images=images)["pixel_values"].to(device)))
    return torch.cat(features)


def length_grouped_batches(pairs, processor, batch_size, max_batch_tokens, num_image_tokens):
    """Sort the pairs by caption length and cut them into batches of at most `batch_size` pairs and at most
    `max_batch_tokens` padded positions (0 = no token limit), then shuffle the batch order (fixed seed).
    Padding then costs little, and a batch's activation memory (∝ pairs × padded length) is bounded.
    With `max_batch_tokens=0`: batches of `batch_size` pairs of similar length."""
    lengths = [num_image_tokens + count for count in caption_token_counts(processor, [c for _, _, c in pairs])]
    order = sorted(range(len(pairs)), key=lengths.__getitem__)
    batches, current = [], []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        too_many_tokens = max_batch_tokens and longest * (len(current) + 1) > max_batch_tokens
        if current and (len(current) == batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    random.Random(0).shuffle(batches)
    return [[pairs[i] for i in batch] for batch in batches]


def ours_step(model, processor, cache, pairs, optimizer, device, weights):
    inputs = processor(suffix=[caption for _, _, caption in pairs]).to(device)  # per-batch padding, labels
    vision_embeds = cache[torch.tensor([index for index, _, _ in pairs], device=device)]
    with autocast(device, weights):
        loss = model(**inputs, vision_embeds=vision_embeds).loss  # logits only where labels != -100
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), inputs["input_ids"].shape[1], int((inputs["labels"][:, 1:] != -100).sum())


def run_ours(args, device, weights):
    weights = resolve_weights(device, weights)
    model = build_model(
        device, weights, DEFAULT_PRESET, tiny=args.tiny, vision_feature_type=args.vision_feature_type
    ).train()
    processor = processor_for(model, DEFAULT_PRESET)
    optimizer = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-4)
    bs = args.batch_size
    # the timed pairs start at an epoch boundary: 5 × 32 = 4 whole passes over the 40 pairs
    warm, timed = pair_stream(args.warmup * bs, seed=1), pair_stream(args.steps * bs)

    def make(pairs):
        if args.group_by_length:
            return length_grouped_batches(pairs, processor, bs, args.max_batch_tokens, model.config.num_image_tokens)
        return [pairs[i : i + bs] for i in range(0, len(pairs), bs)]

    warm_batches, timed_batches = make(warm), make(timed)
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        cache = build_feature_cache(model, processor, device)
        sync(device)
        cache_seconds = time.perf_counter() - start
        log(f"feature cache: {len(cache)} images in {cache_seconds:.2f} s")
        for batch in warm_batches[: args.warmup]:
            ours_step(model, processor, cache, batch, optimizer, device, weights)
        sync(device)
        step_times, cpu_times, shapes, flops = [], [], [], 0.0
        text = model.config.text_config
        with profiled(args.profile):
            for step, batch in enumerate(timed_batches):
                start, cpu_start = time.perf_counter(), time.process_time()
                loss, seq_len, supervised = ours_step(model, processor, cache, batch, optimizer, device, weights)
                sync(device)
                step_times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                shapes.append([len(batch), seq_len])
                # every sequence runs at the batch's padded length; the LM head only at supervised positions
                flops += (
                    len(batch) * frozen_lm_train_flops(text, seq_len, 0)
                    + 2 * 2 * text.hidden_size * text.vocab_size * supervised
                    + projector_train_flops(model.model.multi_modal_projector, len(batch))
                )
                log(
                    f"ours step {step}: {step_times[-1]:.2f} s, batch {len(batch)} × {seq_len} positions, "
                    f"loss {loss:.3f}"
                )
    seconds = sum(step_times)
    tokens = sum(caption_token_counts(processor, [caption for _, _, caption in timed]))
    pairs_per_s = len(timed) / seconds
    cache_per_image = cache_seconds / len(cache)
    return {
        "variant": args.only,
        "max_batch_size": bs,
        "group_by_length": args.group_by_length,
        "max_batch_tokens": args.max_batch_tokens if args.group_by_length else None,
        "batch_shapes": shapes,
        "steps": len(timed_batches),
        "pairs": len(timed),
        "vision_feature_type": args.vision_feature_type,
        "num_image_tokens": model.config.num_image_tokens,
        "step_seconds": [round(t, 3) for t in step_times],
        "pairs_per_s": pairs_per_s,
        "pairs_per_cpu_s": len(timed) / sum(cpu_times),
        "caption_tokens_per_s": tokens / seconds,
        "caption_tokens_per_pair": tokens / len(timed),
        "flops_per_pair": flops / len(timed),
        "feature_cache_s_per_image": cache_per_image,
        "feature_cache_flops_per_image": clip_forward_flops(model.config.vision_config),
        # one epoch over a Flickr30K-style set using all 5 captions per image: each image encoded once
        "pairs_per_s_incl_cache_5_captions_per_image": 1 / (1 / pairs_per_s + cache_per_image / 5),
        **memory.report(),
    }


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    configure_threads(args.threads)
    if args.only:
        torch.manual_seed(0)
        load_before = load_average()
        weights = WEIGHTS_OF[args.only]
        result = (run_course if args.only.startswith("course") else run_ours)(args, device, weights)
        result["weights"] = resolve_weights(device, weights)
        peak = peak_flops(device)
        result["achieved_tflops"] = result["flops_per_pair"] * result["pairs_per_s"] / 1e12
        result["mfu"] = result["achieved_tflops"] * 1e12 / peak if peak else None
        emit_variant(result, load_before)
        return

    runs, results, summary = measure_variants(Path(__file__), "train", args, argv, device, MEDIAN_KEYS)
    variants = list(runs)
    summary |= {"peak_flops_bf16": peak_flops(device), **results}
    # each ratio: ours / the baseline within each round (same load), then the median over the rounds
    ratios = {}
    for base in (b for b in ("course", "course_fp32") if b in runs):
        for v in (v for v in variants if v.startswith("ours")):
            rounds = {
                key: per_round_ratios(runs, v, base, key)
                for key in ("pairs_per_s", "pairs_per_cpu_s", "peak_memory_gib", "flops_per_pair")
            }
            rounds["pairs_per_s_incl_cache_5_captions_per_image"] = per_round_ratios(  # the cache counted
                runs, v, base, "pairs_per_s_incl_cache_5_captions_per_image", baseline_key="pairs_per_s"
            )
            ratios[f"{v}/{base}"] = {key: median(values) for key, values in rounds.items()}
            ratios[f"{v}/{base}"] |= {
                "pairs_per_s_rounds": rounds["pairs_per_s"],
                "peak_memory_gib_rounds": rounds["peak_memory_gib"],
            }
    summary["ratios"] = ratios
    summary["targets"] = {
        name: {"pairs_per_s_at_least_5x": r["pairs_per_s"] >= 5, "peak_memory_at_most_1x": r["peak_memory_gib"] <= 1}
        for name, r in ratios.items()
        if name.endswith("/course")
    }
    headline = headline_ratios(ratios, "train", "pairs_per_s", default="ours", bf16="ours_bf16")
    if "ours" in results:
        headline["train_ours_precision"] = results["ours"]["weights"]
    path = results_path(args)
    if path and "course" in runs:
        figures = {key: summary[key] for key in ("command", "torch", "rounds", "threads", "ratios", "targets")}
        write_results("train", figures | results, headline, environment(device), path)
    emit(summary)


if __name__ == "__main__":
    main()
