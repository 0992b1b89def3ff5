#!/usr/bin/env python
"""The Flickr8k experiment behind configs/flickr8k.json: which layout makes a frozen real decoder use a real image.

    python scripts/flickr8k_experiments.py --output_dir outputs/flickr8k-exp --runs course,course-blind --max_steps 300

Every run is `run_captioning.py configs/flickr8k.json` (frozen EfficientNet-Lite0 ImageNet tower → projector → frozen
SmolLM2-135M, image features cached once and shared by all runs) with the overrides in RUNS, trained on Flickr8k
train and scored on the first `--eval_images` val photos. Nothing here touches the held-back test split. A
`-blind` twin is the same run with every photo's features replaced by the train-set mean (per position), so the
projector can learn only a constant prompt: what the decoder writes without seeing. Each run goes into
<output_dir>/<run>/ (run_captioning's usual files: all_results.json, training curves, sample captions); the table of
all runs into <output_dir>/results.md and results.json. docs/flickr8k.md reports the results.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipqwen.presets import LAYOUTS  # noqa: E402


PREFIX = LAYOUTS["clipcap"]["prompt"]  # a word before the image keeps the image tokens off the decoder's position 0
RUNS = {
    # the course layout (--preset seed_exact): pooled embedding → Linear → one image token at position 0
    "course": dict(LAYOUTS["seed_exact"]),
    # the same with a fixed text token before the image
    "prefix": dict(LAYOUTS["seed_exact"], prompt=PREFIX),
    # ClipCap (the default, --preset clipcap): the pooled embedding expanded into K tokens by an MLP
    "clipcap": dict(LAYOUTS["clipcap"]),
    # LLaVA: the 7×7 feature map, one token per position, through an MLP
    "patch": dict(projector_type="mlp2x_gelu", vision_feature_type="patch", vision_feature_layer=-1, prompt=PREFIX),
    # ClipCap over the pooled map and each cell of a 2×2 grid on it: where things are, in 10 tokens
    "grid": dict(
        projector_type="mlp2x_gelu",
        vision_feature_type="grid",
        vision_feature_layer=-1,
        num_pooled_image_tokens=2,
        prompt=PREFIX,
    ),
}
RUNS |= {f"{name}-blind": dict(settings, blind=True) for name, settings in RUNS.items()}
RUNS |= {f"{name}-lora": dict(settings, lora_r=8) for name, settings in RUNS.items() if "blind" not in name}
METRICS = ("eval_bleu4", "eval_cider", "eval_rougeL", "eval_loss", "eval_image_reliance", "eval_distinct_captions")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/flickr8k-exp"))
    parser.add_argument(
        "--runs",
        default="course,course-blind,prefix,clipcap,clipcap-blind,patch,patch-blind",
        help=f"comma-separated, from {sorted(RUNS)}",
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--eval_images", type=int, default=250, help="val photos scored per run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this one run in this process
    args, run_captioning_flags = parser.parse_known_args(argv)
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {sorted(RUNS)}")
    return args, run_captioning_flags


def blinded(prepare_data):
    """`prepare_data` with every split's features replaced by the train split's mean features: every photo looks
    the same. (Not zeros: a zero vector at a decoder position is a fixed point of its pre-norm layers, where
    RMSNorm's Jacobian is 1/sqrt(eps), and the first gradient overflows — docs/evidence.md.)"""
    import numpy as np

    def prepare_blind(*args, **kwargs):
        data = prepare_data(*args, **kwargs)
        train = data.splits["train"].with_format("numpy", columns=["vision_embeds"])
        total = sum(batch["vision_embeds"].astype(np.float64).sum(0) for batch in train.iter(batch_size=500))
        mean = (total / len(train)).astype(np.float32)

        def replace(batch):
            return {"vision_embeds": np.broadcast_to(mean, np.shape(batch["vision_embeds"])).copy()}

        for split, dataset in data.splits.items():
            blind = dataset.with_format(None).map(replace, batched=True, desc=f"blinding {split} features")
            data.splits[split] = blind.with_format(
                dataset.format["type"],
                columns=dataset.format["columns"],
                output_all_columns=dataset.format["output_all_columns"],
            )
        return data

    return prepare_blind


def run_one(name: str, args, flags: list[str]) -> None:
    import run_captioning
    from clipqwen.backbones.efficientnet_lite import save_lite0
    from clipqwen.backbones.wheel_weights import save_smollm2
    from clipqwen.hub import clipqwen_cache_dir

    settings = dict(RUNS[name])
    if settings.pop("blind", False):
        run_captioning.prepare_data = blinded(run_captioning.prepare_data)
    converted = clipqwen_cache_dir() / "converted"
    argv = [
        str(ROOT / "configs" / "flickr8k.json"),
        "--output_dir",
        str(args.output_dir / name),
        "--vision_model_name_or_path",
        str(save_lite0(converted / "efficientnet-lite0")),
        "--text_model_name_or_path",
        str(save_smollm2(converted / "smollm2-135m")),
        "--dataset_name",
        args.data,
        "--max_eval_samples",
        str(args.eval_images),
        "--do_predict",
        "False",
        "--overwrite_output_dir",
        "True",
        "--save_strategy",
        "no",
    ]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    run_captioning.main(run_captioning.parse_args(argv + flags))


def main(argv=None):
    args, flags = parse_args(argv)
    if args.one:
        return run_one(args.one, args, flags)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.runs.split(","):
        start = time.time()
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--output_dir",
            str(args.output_dir),
            "--data",
            args.data,
            "--eval_images",
            str(args.eval_images),
            *flags,
        ]
        print(time.strftime("%H:%M:%S"), "run", name, flush=True)
        with open(args.output_dir / f"{name}.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ).returncode
        results = args.output_dir / name / "all_results.json"
        metrics = json.loads(results.read_text()) if code == 0 and results.is_file() else {}
        rows[name] = {
            "settings": RUNS[name],
            "wall_seconds": round(time.time() - start),
            "train_seconds": metrics.get("train_runtime"),
            **{key: metrics.get(key) for key in METRICS},
            "exit_code": code,
        }
        print(time.strftime("%H:%M:%S"), name, {key: rows[name][key] for key in METRICS}, flush=True)
        write_tables(args.output_dir, rows, flags)


def write_tables(folder: Path, rows: dict, flags: list[str]) -> None:
    (folder / "results.json").write_text(json.dumps({"flags": flags, "runs": rows}, indent=2))
    header = "| run | BLEU-4 | CIDEr-D | ROUGE-L | val loss | image reliance | distinct | train s | wall s |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for name, row in rows.items():
        cells = [f"{row[key]:.3f}" if isinstance(row[key], float) else "–" for key in METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} | {row['train_seconds'] or '–'} | {row['wall_seconds']} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
