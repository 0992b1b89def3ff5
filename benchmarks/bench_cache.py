"""The feature cache's decode + preprocess stage: images/s with 1 and 2 worker processes against the path it
replaces (a decode for the unreadable-image check, then a decode again + preprocessing for the features, one
process), on generated JPEGs of Flickr30K's sizes and quality. The vision tower is left out: it runs in the main
process on the workers' batches, on the GPU in a real run, and is the same in both paths.

    python benchmarks/bench_cache.py [--images 300] [--rounds 3] [--output benchmarks/cache_results.json]

Rounds alternate the paths (old, 1 worker, 2 workers, then the other way round) and the median of each is
reported, since other jobs share this machine; images per CPU-second (this process and its workers) are
reported as well, which the load of other jobs changes much less than the wall clock. Decodes per image are counted on every path (a shared file, so
that worker processes count too). Also reported: where one image's time goes (PIL decode, `load_image`'s checks
and RGB conversion, `preprocess_images`), single-threaded.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clipqwen import data  # noqa: E402
from clipqwen.presets import bundled_processor  # noqa: E402

# Flickr30K's most common sizes (the long side is 500 px); quality as its JPEGs (about 90).
SIZES = [(500, 375), (500, 333), (375, 500), (333, 500), (500, 281), (500, 400), (500, 334), (400, 500)]


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: smooth random colour fields (upscaled noise) with fine grain, so that they compress like
    photos (~60-120 kB at quality 90), not like flat colour or white noise."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        name = f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def annotation_dataset(folder: Path, names: list[str]) -> datasets.Dataset:
    (folder / "train.jsonl").write_text("".join(json.dumps({"image": name, "caption": "a photo"}) + "\n" for name in names))
    return data.read_annotation_file(str(folder / "train.jsonl"), "image", "caption", None)


class DecodeCounter:
    """`clipqwen.data.load_image` counted per image name, through a file: worker processes (forked) count too."""

    def __init__(self, path: Path):
        self.path, self.original = path, data.load_image

    def __enter__(self):
        self.path.write_text("")
        original, path = self.original, self.path

        def counted(entry, name=None):
            with open(path, "a") as file:
                file.write(f"{name}\n")
            return original(entry, name=name)

        data.load_image = counted
        return self

    def __exit__(self, *exc):
        data.load_image = self.original

    def per_image(self) -> dict:
        counts = Counter(self.path.read_text().splitlines())
        spread = Counter(counts.values())
        return {"decodes_per_image": dict(sorted(spread.items())), "images": len(counts)}


def old_path(dataset, processor, batch_size):
    """What a first run did before: `drop_unreadable_images` (a decode of every image), then the feature map's
    decode + `preprocess_images`, batch by batch, in one process (the vision tower left out)."""
    checked = data.drop_unreadable_images(dataset, "bench")
    raw = checked.with_format(None).cast_column("image", datasets.Image(decode=False))
    for start in range(0, len(raw), batch_size):
        batch = raw[start:start + batch_size]
        images = [data.load_image(entry, name=entry.get("path") or "image") for entry in batch["image"]]
        processor.preprocess_images(images)


def new_path(dataset, processor, batch_size, workers):
    """The decode-once pass of `add_vision_features`: `_DecodedBatches` through a DataLoader with `workers`
    processes, exactly as `_encode_to_file` builds it (chunks of `DECODE_CHUNK` images; the vision tower left out)."""
    raw = dataset.with_format(None).select_columns(["image", "image_id"]).cast_column("image", datasets.Image(decode=False))
    batches = data._DecodedBatches(raw, processor, range(len(raw)), batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=data._as_is,
                                         worker_init_fn=data._one_thread if workers else None,
                                         prefetch_factor=4 if workers else None)
    rows = 0
    for _, _, pixel_values, reasons in loader:
        rows += len(reasons)
    assert rows == len(raw)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the DataLoader workers, joined when the
    loader is exhausted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def breakdown(folder: Path, names: list[str], processor, count: int = 100) -> dict:
    """Milliseconds per image of each step, one thread, over `count` images (each step timed on its own)."""
    paths = [folder / name for name in names[:count]]
    timings = {}
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.load()
    timings["pil_decode_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    start = time.perf_counter()
    loaded = [data.load_image(str(path)) for path in paths]
    timings["load_image_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    start = time.perf_counter()
    for i in range(0, len(loaded), 64):
        processor.preprocess_images(loaded[i:i + 64])
    timings["preprocess_images_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    return {key: round(value, 2) for key, value in timings.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "cache_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    processor = bundled_processor()

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        folder = Path(tmp)
        names = make_images(folder, args.images)
        sizes = [os.path.getsize(folder / name) for name in names]
        dataset = annotation_dataset(folder, names)
        paths = {
            "old (check decode + decode + preprocess, 1 process)": lambda: old_path(dataset, processor, args.batch_size),
            "new, 1 worker": lambda: new_path(dataset, processor, args.batch_size, 1),
            "new, 2 workers": lambda: new_path(dataset, processor, args.batch_size, 2),
        }
        rates = {name: [] for name in paths}
        per_cpu = {name: [] for name in paths}  # load-independent: images per second of CPU (main + workers)
        decodes = {}
        for round_ in range(args.rounds):
            order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
            for name in order:
                with DecodeCounter(folder / "decodes.txt") as counter:
                    cpu_before = cpu_seconds()
                    start = time.perf_counter()
                    paths[name]()
                    elapsed = time.perf_counter() - start
                    cpu = cpu_seconds() - cpu_before
                rates[name].append(len(names) / elapsed)
                per_cpu[name].append(len(names) / cpu)
                decodes[name] = counter.per_image()
                print(f"round {round_ + 1}: {name}: {rates[name][-1]:.1f} images/s, {per_cpu[name][-1]:.1f} images "
                      f"per CPU-second", flush=True)
        steps = breakdown(folder, names, processor)

    median = {name: statistics.median(values) for name, values in rates.items()}
    cpu_median = {name: statistics.median(values) for name, values in per_cpu.items()}
    old, one, two = (median[name] for name in paths)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "images": len(names), "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1e3, 1), "rounds": args.rounds,
        "images_per_s_median": {name: round(value, 1) for name, value in median.items()},
        "images_per_s_all_rounds": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "images_per_cpu_second_median": {name: round(value, 1) for name, value in cpu_median.items()},
        "cache_worker_scaling": round(two / one, 2),
        "new_1_worker_vs_old": round(one / old, 2),
        "new_per_core_vs_old_per_core": {"1 worker": round(one / old, 2), "2 workers": round(two / 2 / old, 2)},
        "new_per_cpu_second_vs_old": {name: round(value / list(cpu_median.values())[0], 2)
                                      for name, value in list(cpu_median.items())[1:]},
        "decodes": decodes,
        "single_thread_ms_per_image": steps,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
