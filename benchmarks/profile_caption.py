"""Where one batch-1 caption's time goes: image preprocessing, image tower, prefill, and each decode step split
into decoder body / LM head / sampling, next to `generate()` for the same caption (the rest is generate's own
overhead), against the floor: the bytes of weights read ÷ the memory bandwidth measured in the same process.

    python benchmarks/make_random_model.py /tmp/cq-full          # full size, random weights, once
    python benchmarks/profile_caption.py /tmp/cq-full --threads 1 --precision bf16 int8 --repeats 3

Every phase runs `--repeats` times (alternating precisions by round is not possible in one process with one
copy in memory each; the load average before and after is printed) and the median is reported, as
[wall-clock ms, CPU ms of this process]: on a shared machine the scheduler gives this process part of a core, and
the CPU time is what a quiet machine would show (memory traffic of the other processes still slows it).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from benchmarks.common import (  # noqa: E402
    caption_bytes,
    clocked,
    configure_threads,
    image_paths,
    load_average,
    log,
    stream_bandwidth,
)
from clipqwen.inference.loading import load_clipqwen  # noqa: E402
from clipqwen.inference.packed_linear import decoding_path  # noqa: E402


def timed(fn, repeats):
    """((median wall, median CPU seconds), the last result)."""
    runs = [clocked(fn) for _ in range(repeats)]
    return tuple(statistics.median(r[0][i] for r in runs) for i in (0, 1)), runs[-1][1]


@torch.inference_mode()
def profile(model, processor, path, new_tokens, repeats):
    preprocess_s, inputs = timed(lambda: processor(images=[Image.open(path)], text=[""]), repeats)
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    suppress = torch.tensor(model.generation_config.suppress_tokens or [], dtype=torch.long)

    tower_s, features = timed(lambda: model.model.get_image_features(inputs["pixel_values"]).pooler_output, repeats)

    def prefill():
        embeds = embed(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        cache = DynamicCache(config=model.config.text_config)
        hidden = lm(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state[:, -1:]
        return cache, model.lm_head(hidden)

    prefill_s, (cache, logits) = timed(prefill, repeats)

    body, head, sample = [], [], []
    token = logits[:, -1].float().argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):  # prefill wrote the first token
        t0 = (time.perf_counter(), time.process_time())
        hidden = lm(inputs_embeds=embed(token), cache=cache, use_cache=True).last_hidden_state
        t1 = (time.perf_counter(), time.process_time())
        logits = model.lm_head(hidden)
        t2 = (time.perf_counter(), time.process_time())
        scores = logits[:, -1].float()
        scores[:, suppress] = float("-inf")
        token = scores.argmax(-1, keepdim=True)
        token.item()
        t3 = (time.perf_counter(), time.process_time())
        for phase, (a, b) in ((body, (t0, t1)), (head, (t1, t2)), (sample, (t2, t3))):
            phase.append((b[0] - a[0], b[1] - a[1]))

    def generate():
        # greedy, whatever the model's generation_config says: the phases above are one greedy caption's
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1
        )

    generate()  # warm-up
    generate_s, _ = timed(generate, repeats)
    ms = lambda s: [round(1000 * s[0], 1), round(1000 * s[1], 1)]  # noqa: E731  [wall, CPU] milliseconds
    median = lambda runs: tuple(statistics.median(r[i] for r in runs) for i in (0, 1))  # noqa: E731
    step = {"body": median(body), "head": median(head), "sample": median(sample)}
    accounted = [tower_s[i] + prefill_s[i] + (new_tokens - 1) * sum(v[i] for v in step.values()) for i in (0, 1)]
    return {
        "preprocess_ms": ms(preprocess_s),
        "image_tower_ms": ms(tower_s),
        "prefill_ms": ms(prefill_s),
        "decode_step_ms": {key: ms(value) for key, value in step.items()},
        "generate_ms": ms(generate_s),
        "generate_overhead_per_step_ms": ms([(generate_s[i] - accounted[i]) / (new_tokens - 1) for i in (0, 1)]),
        "caption_ms": ms([preprocess_s[i] + generate_s[i] for i in (0, 1)]),
        "prompt_tokens": inputs["input_ids"].shape[1],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved clipqwen folder (benchmarks/make_random_model.py)")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["bf16", "int8"],
        help="each of fp32, bf16, int8, with :plain for the decoder's weights as stored (not prepacked for oneDNN)",
    )
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    path = image_paths(1)[0]
    report = {"load_average_1min": [load_average()], "threads": torch.get_num_threads()}
    report["bandwidth"] = stream_bandwidth()
    for precision in args.precision:
        weights, _, plain = precision.partition(":")
        model, processor = load_clipqwen(args.model, precision=weights, pack_weights=not plain)
        lm_bytes, read_bytes = caption_bytes(model, args.new_tokens)
        result = {"path": decoding_path(model), **profile(model, processor, path, args.new_tokens, args.repeats)}
        result["decoder_weight_gb_per_token"] = round(lm_bytes / 1e9, 3)
        result["floor_ms"] = [
            round(1000 * read_bytes / (report["bandwidth"][key] * 1e9), 1)
            for key in ("read_gb_s_wall", "read_gb_s_cpu")
        ]
        result["ratio_to_floor"] = [round(c / f, 2) for c, f in zip(result["caption_ms"], result["floor_ms"])]
        report[precision] = result
        log(precision, json.dumps(result))
        del model
    report["load_average_1min"].append(load_average())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
