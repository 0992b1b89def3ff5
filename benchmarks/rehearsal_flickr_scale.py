"""Flickr30K-scale rehearsal of the data path on this CPU: a generated data set in Flickr30K's layout through
`run_captioning.py` with the tiny backbones, once per number of decoding workers.

    python benchmarks/rehearsal_flickr_scale.py [--images 3100] [--workers 1 2] [--output rehearsal.json]

The data set has what the real one has where the data path can tell: JPEGs of Flickr30K's sizes (the long side
500 px: 500×333, 500×375, 375×500, ...) at quality 90, five captions per image, and the layout of the Hub's parquet
conversion of nlphuji/flickr30k (one table: `image` with the JPEG bytes, `caption` a list of five, `sentids`,
`split` train / val / test in the Karpathy proportions, `img_id`, `filename`), read as a local `--dataset_name`
with `--split_column split`, as a real run reads the Hub copy.

Each run builds the feature cache from scratch (its own folder) with `--preprocessing_num_workers N`, trains a few
steps, evaluates and predicts; the numbers come from its `all_results.json` (phase timings: data preparation,
feature cache, training, evaluation). Pillow's real decodes (`ImageFile.load` with pixels left to read) are counted
during each run, so "decodes per image" covers every caller, the sample picture of the model card included.
The runs follow each other (no alternation: each builds a cache of 3,100 images), so the load average is recorded
beside each.
"""

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from bench_cache import SIZES, machine  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402

import run_captioning  # noqa: E402
from clipqwen.data.sources import FLICKR30K_FEATURES  # noqa: E402


# Karpathy's proportions of Flickr30K (29,000 / 1,014 / 1,000 images).
KARPATHY = {"train": 29000, "val": 1014, "test": 1000}
WORDS = (
    "a man woman dog child girl boy people group street red blue bike water grass ball beach city shirt "
    "running sitting walking playing standing jumping near in on with the of two young old black white"
).split()


def photo(rng, width, height) -> bytes:
    """A photo-like JPEG (smooth colour fields with grain: compresses like a photo, ~60-120 kB at quality 90)."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_flickr_like(folder: Path, count: int, seed: int = 0, shard_rows: int = 500) -> dict:
    """Parquet shards in nlphuji/flickr30k's column layout (named `test-*.parquet`, as its conversion names them, so
    that `datasets` sees one split); returns the split sizes and the mean JPEG size in kB."""
    rng = np.random.default_rng(seed)
    total = sum(KARPATHY.values())
    sizes = {split: max(1, round(count * n / total)) for split, n in KARPATHY.items()}
    labels = [split for split, n in sizes.items() for _ in range(n)]
    rng.shuffle(labels)  # as in the real table, the splits are interleaved
    features = FLICKR30K_FEATURES
    folder.mkdir(parents=True, exist_ok=True)
    jpeg_bytes = 0
    for shard, start in enumerate(range(0, len(labels), shard_rows)):
        rows = {key: [] for key in features}
        for i in range(start, min(start + shard_rows, len(labels))):
            width, height = SIZES[i % len(SIZES)]
            name = f"{1000000 + i}.jpg"
            rows["image"].append({"bytes": photo(rng, width, height), "path": name})
            jpeg_bytes += len(rows["image"][-1]["bytes"])
            rows["caption"].append([" ".join(rng.choice(WORDS, int(rng.integers(6, 16)))) for _ in range(5)])
            rows["sentids"].append([str(5 * i + k) for k in range(5)])
            rows["split"].append(labels[i])
            rows["img_id"].append(str(i))
            rows["filename"].append(name)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"test-{shard:05d}.parquet"))
    return sizes, jpeg_bytes / len(labels) / 1e3


def count_decodes(log: Path):
    """Pillow's real decodes, each logged with the project function that asked for it (the nearest caller in this
    repository, past load_image), so that the feature pass's decodes and any other (the model card's sample
    picture) are told apart. Through a file: worker processes count too."""
    original = ImageFile.ImageFile.load

    def counted(image):
        if image.tile:
            frame = sys._getframe(1)
            while frame is not None and not (
                frame.f_code.co_filename.startswith(str(ROOT))
                and "site-packages" not in frame.f_code.co_filename
                and not frame.f_code.co_filename.endswith("images.py")
            ):
                frame = frame.f_back
            caller = (
                "elsewhere"
                if frame is None
                else (f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_code.co_name}")
            )
            with open(log, "a") as file:
                file.write(f"{caller}\n")
        return original(image)

    ImageFile.ImageFile.load = counted
    return original


def run_once(data_dir: Path, out: Path, workers: int, max_steps: int, log: Path) -> dict:
    flags = [
        "--tiny_model",
        "--report_to",
        "none",
        "--dataset_name",
        str(data_dir),
        "--split_column",
        "split",
        "--image_column",
        "image",
        "--caption_column",
        "caption",
        "--id_column",
        "img_id",
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "16",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--dataloader_pin_memory",
        "False",
        "--disable_tqdm",
        "True",
        "--preprocessing_num_workers",
        str(workers),
        "--feature_cache_dir",
        str(out / "features"),
        "--max_new_tokens",
        "8",
        "--output_dir",
        str(out / "run"),
    ]
    log.write_text("")
    original = count_decodes(log)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        run_captioning.main(run_captioning.parse_args(flags))
    finally:
        ImageFile.ImageFile.load = original
    wall = time.perf_counter() - start
    results = json.loads((out / "run" / "all_results.json").read_text())
    callers = Counter(log.read_text().splitlines())
    return {
        "workers": workers,
        "wall_seconds": round(wall, 1),
        "pixel_decodes": sum(callers.values()),
        "pixel_decodes_by_caller": dict(callers.most_common()),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "phases": {key: value for key, value in results.items() if key.startswith("time_")},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "rehearsal_results.json"))
    args = parser.parse_args()
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        sizes, jpeg_kb = make_flickr_like(folder / "flickr30k-like", args.images)
        generated = time.perf_counter() - start
        runs = [
            run_once(
                folder / "flickr30k-like", folder / f"run-{workers}", workers, args.max_steps, folder / "decodes.txt"
            )
            for workers in args.workers
        ]
    images = sum(sizes.values())
    for run in runs:
        run["pixel_decodes_per_image"] = round(run["pixel_decodes"] / images, 3)
        feature_pass = sum(n for caller, n in run["pixel_decodes_by_caller"].items() if "__getitem__" in caller)
        run["feature_pass_decodes_per_image"] = round(feature_pass / images, 3)
        run["feature_cache_images_per_s"] = run["phases"].get("time_feature_cache_per_second")
    rates = {run["workers"]: run["feature_cache_images_per_s"] for run in runs}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "images": images,
        "splits": sizes,
        "mean_jpeg_kb": round(float(jpeg_kb), 1),
        "generation_seconds": round(generated, 1),
        "runs": runs,
        "feature_cache_worker_scaling": (round(rates[2] / rates[1], 2) if rates.get(1) and rates.get(2) else None),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
