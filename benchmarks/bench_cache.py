"""The feature cache's data path (decode + preprocess) and the whole cache build, against the path it replaces, on
generated JPEGs of Flickr30K's sizes and quality; and the parity of the new preprocessing with the old.

    python benchmarks/bench_cache.py [--images 400] [--rounds 5] [--output benchmarks/cache_results.json]

Paths timed (images/s, medians of alternating rounds: old, new 1 worker, new 2 workers, then the other way round):
- data path alone, the vision tower left out (it runs on the workers' batches in the main process, on the GPU in a
  real run, and is the same in both paths):
  old = what a first run did before: `drop_unreadable_images` (a decode of every image), then a second decode and
  the image processor's own call (`preprocess_images` below), one process; new = `_DecodedChunks` through a
  DataLoader with 1 or 2 worker processes, exactly as `add_vision_features` builds it (one decode, the processor's
  `ClipPixels`);
- end to end with the tiny CLIP of the tests: old = the check, then decode + `preprocess_images` + vision tower
  batch by batch; new = `add_vision_features` into a fresh cache folder (Arrow file, manifest and all).

Other jobs share this machine, so the wall clock alone cannot say whether 2 workers scale: the same rounds time a
CPU-bound control (the same fixed work in 1 and then 2 processes) whose ratio is what this machine gave two
processes at that moment (`machine_scaling_ceiling`), and CPU-seconds per image (main process and workers), which
the load changes much less. Decodes per image are counted where Pillow really decodes (`ImageFile.load` with pixels
left to read), through a file, so that worker processes count too.

Parity: pixel values and features (the tiny CLIP, and a full-size random CLIP ViT-B/32: no weights can be
downloaded here) of `pixel_values` against the image processor's own call (`preprocess_images`), on the real
CC-BY photos of examples/coco-cc-by and ../shared/data/coco-cc-by and on the generated images.
"""

import argparse
import datetime
import json
import multiprocessing
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
from PIL import Image, ImageFile  # noqa: E402

from benchmarks import common  # noqa: E402
from clipqwen.data import cleaning, feature_cache, sources  # noqa: E402
from clipqwen.images import load_image  # noqa: E402
from clipqwen.tiny import bundled_processor, tiny_config  # noqa: E402
from modeling_clipqwen import ClipQwenForConditionalGeneration  # noqa: E402
from processing_clipqwen import bound_aspect_ratio, to_rgb  # noqa: E402


# Flickr30K's most common sizes (the long side is 500 px); quality as its JPEGs (about 90).
SIZES = [(500, 375), (500, 333), (375, 500), (333, 500), (500, 281), (500, 400), (500, 334), (400, 500)]
PHOTO_FOLDERS = [ROOT / "examples" / "coco-cc-by", ROOT.parent / "shared" / "data" / "coco-cc-by"]
OLD = "old (check decode + decode + convert + preprocess, 1 process)"
NEW = {1: "new, 1 worker", 2: "new, 2 workers"}
IN_PROCESS = "new, in the main process (no worker)"


def make_images(folder: Path, count: int, seed: int = 0, sizes=SIZES, quality: int = 90) -> list[str]:
    """Photo-like JPEGs: smooth random colour fields (upscaled noise) with fine grain, so that they compress like
    photos (~60-120 kB at quality 90), not like flat colour or white noise."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        name = f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=quality)
        names.append(name)
    return names


def annotation_dataset(folder: Path, names: list[str]) -> datasets.Dataset:
    lines = "".join(json.dumps({"image": name, "caption": "a photo"}) + "\n" for name in names)
    (folder / "train.jsonl").write_text(lines)
    return sources.read_annotation_file(str(folder / "train.jsonl"), "image", "caption", None)


class DecodeCounter:
    """Pillow's real decodes (`ImageFile.load` with pixels left to read) per file, through a file: worker processes
    (forked) count too."""

    def __init__(self, path: Path):
        self.path, self.original = path, ImageFile.ImageFile.load

    def __enter__(self):
        self.path.write_text("")
        original, path = self.original, self.path

        def counted(image):
            if image.tile:
                with open(path, "a") as file:
                    file.write(f"{image.filename or '<bytes>'}\n")
            return original(image)

        ImageFile.ImageFile.load = counted
        return self

    def __exit__(self, *exc):
        ImageFile.ImageFile.load = self.original

    def per_image(self) -> dict:
        counts = Counter(self.path.read_text().splitlines())
        return {
            "decodes_per_image": {str(k): v for k, v in sorted(Counter(counts.values()).items())},
            "images": len(counts),
        }


def pixel_values(images: list, processor) -> torch.Tensor:
    """The processor's pixel values (CLIP's recipe, `ClipPixels`, for PIL images): the one path since."""
    return processor(images=images)["pixel_values"]


def preprocess_images(images: list, processor) -> torch.Tensor:
    """The image processor's own call, as the processor's `preprocess_images` made it before `ClipPixels`."""
    images = [bound_aspect_ratio(to_rgb(image)) for image in images]
    return processor.image_processor(images, return_tensors="pt", do_convert_rgb=False)["pixel_values"]


def old_data_path(dataset, processor, batch_size, model=None):
    """What a first run did before: `drop_unreadable_images` (a decode of every image), then the feature map's
    decode + `preprocess_images` (which converts to RGB again), batch by batch, in one process; with `model`, its
    vision tower on each batch too. The second decode converts as `load_image` used to (`to_rgb`: two copies even
    of an RGB image); the check runs today's `load_image`, which no longer copies RGB images: if anything, this
    makes the old path a little faster than it was."""
    checked = cleaning.drop_unreadable_images(dataset, "bench")
    raw = checked.with_format(None).cast_column("image", datasets.Image(decode=False))
    for start in range(0, len(raw), batch_size):
        batch = raw[start : start + batch_size]
        images = [to_rgb(load_image(entry, name=entry.get("path") or "image")) for entry in batch["image"]]
        pixels = preprocess_images(images, processor)
        if model is not None:
            with torch.no_grad():
                model.get_vision_embeds(pixels)


def new_data_path(dataset, processor, batch_size, workers):
    """The decode-once pass of `add_vision_features`: the very DataLoader `_encode_to_file` reads, with `workers`
    processes (the vision tower left out)."""
    _, loader = feature_cache._decoding_loader(dataset, processor, range(len(dataset)), batch_size, workers)
    rows = sum(len(reasons) for _, _, _, reasons in loader)
    assert rows == len(dataset)


def new_end_to_end(dataset, processor, batch_size, workers, model, cache_dir):
    feature_cache.add_vision_features(dataset, model, processor, cache_dir, batch_size, num_workers=workers)


def _busy(work: int) -> None:
    value = 0
    for i in range(work):
        value += i * i % 7


def control(processes: int, work: int) -> float:
    """Units of fixed CPU work per second done by `processes` processes at once (each does `work` units)."""
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    jobs = [context.Process(target=_busy, args=(work,)) for _ in range(processes)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    return processes / (time.perf_counter() - start)


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children: the DataLoader workers, joined when the loader is exhausted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def breakdown(folder: Path, names: list[str], processor, count: int = 100) -> dict:
    """CPU milliseconds per image of each step (this process's CPU time, so other jobs' load changes it little),
    one thread, over `count` images, each step timed on its own."""
    paths = [folder / name for name in names[:count]]
    fast = processor.clip_pixels
    timings = {}

    def timed(key, step):
        start = time.process_time()
        result = step()
        timings[key] = (time.process_time() - start) / len(paths) * 1e3
        return result

    def decode_all():
        for path in paths:
            with Image.open(path) as image:
                image.load()

    timed("pil_decode_ms", decode_all)
    loaded = timed("load_image_ms", lambda: [load_image(str(path)) for path in paths])
    timed(
        "old_preprocess_images_ms",
        lambda: [preprocess_images(loaded[i : i + 64], processor) for i in range(0, len(loaded), 64)],
    )
    crops = timed("new_crop_ms", lambda: [fast.crop(image) for image in loaded])
    stacked = torch.stack(crops)
    timed("new_normalise_ms", lambda: [fast.normalise(stacked[i : i + 64]) for i in range(0, len(stacked), 64)])
    return {key: round(value, 2) for key, value in timings.items()}


def differences(new: torch.Tensor, old: torch.Tensor) -> dict:
    delta = (new - old).abs()
    flat_new, flat_old = new.flatten(1), old.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(flat_new, flat_old, dim=1)
    return {
        "max_abs": float(delta.max()),
        "mean_abs": float(delta.mean()),
        "max_abs_over_mean_abs_value": float(delta.max() / old.abs().mean()),
        "fraction_differing": float((delta > 0).float().mean()),
        "min_cosine": float(cosine.min()),
    }


@torch.no_grad()
def parity(processor, generated: list[Path]) -> dict:
    """`pixel_values` (the cache's and the no-cache collator's path) against the image processor's own call (the
    path before, `preprocess_images`): pixel values and features."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    photos = sorted({path.name: path for folder in PHOTO_FOLDERS for path in folder.glob("*.jpg")}.values())
    result = {}
    torch.manual_seed(0)
    tiny = ClipQwenForConditionalGeneration(tiny_config()).eval()
    torch.manual_seed(0)
    full = CLIPVisionModelWithProjection(CLIPVisionConfig()).eval()  # CLIP ViT-B/32's shape, random weights
    for label, paths in (("real_photos", photos), ("generated_flickr_sized", generated)):
        images = [load_image(path) for path in paths]
        new, old = pixel_values(images, processor), preprocess_images(images, processor)
        entry = {
            "images": len(images),
            "pixel_values": differences(new, old),
            "tiny_clip_features": differences(tiny.get_vision_embeds(new), tiny.get_vision_embeds(old)),
        }
        full_new, full_old = (full(pixel_values=p, output_hidden_states=True) for p in (new, old))
        entry["clip_b32_random_pooled_projected"] = differences(full_new.image_embeds, full_old.image_embeds)
        entry["clip_b32_random_penultimate_patches"] = differences(
            full_new.hidden_states[-2], full_old.hidden_states[-2]
        )
        result[label] = entry
    return result


def ratios(rates: dict, cpu_total: dict, ceiling_per_round: list[float]) -> dict:
    """The ratios benchmarks/results.json takes over (data path alone, the vision tower left out), each the median
    of its per-round ratios: the paths of one round ran back to back, under nearly the same load."""

    def per_round(kind, top, bottom, scale=1.0):
        return round(statistics.median([a / b * scale for a, b in zip(rates[kind][top], rates[kind][bottom])]), 2)

    ceiling = statistics.median(ceiling_per_round)
    scaling = per_round("data", NEW[2], NEW[1])
    return {
        "cache_worker_scaling": scaling,
        "cache_new_vs_old_per_core": per_round("data", NEW[1], OLD),
        "cache_new_2_workers_vs_old_per_core": per_round("data", NEW[2], OLD, 0.5),
        "cache_new_vs_old_per_cpu_second": round(cpu_total[OLD] / cpu_total[NEW[1]], 2),
        "cache_new_in_process_vs_old": per_round("data", IN_PROCESS, OLD),
        "cache_new_in_process_vs_old_per_cpu_second": round(cpu_total[OLD] / cpu_total[IN_PROCESS], 2),
        # what this machine gave a second process at that moment: 2.0 on two free cores
        "machine_scaling_ceiling": round(ceiling, 2),
        "cache_worker_scaling_of_ceiling": round(scaling / ceiling, 2),
        "end_to_end_tiny_clip": {
            "cache_worker_scaling": per_round("end_to_end_tiny_clip", NEW[2], NEW[1]),
            "new_1_worker_vs_old": per_round("end_to_end_tiny_clip", NEW[1], OLD),
        },
    }


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        flags = set(fields.get("flags", "").split())
        info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
    except OSError:
        pass
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "cache_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process as one core's worth: the workers have the other
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    processor = bundled_processor()
    info = machine()

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        folder = Path(tmp)
        names = make_images(folder, args.images)
        sizes = [os.path.getsize(folder / name) for name in names]
        dataset = annotation_dataset(folder, names)
        torch.manual_seed(0)
        model = ClipQwenForConditionalGeneration(tiny_config()).eval()
        work = 2_000_000
        caches = iter(range(10**6))
        paths = {
            "data": {
                OLD: lambda: old_data_path(dataset, processor, args.batch_size),
                IN_PROCESS: lambda: new_data_path(dataset, processor, args.batch_size, 0),
                **{NEW[w]: (lambda w=w: new_data_path(dataset, processor, args.batch_size, w)) for w in NEW},
            },
            "end_to_end_tiny_clip": {
                OLD: lambda: old_data_path(dataset, processor, args.batch_size, model),
                **{
                    NEW[w]: (
                        lambda w=w: new_end_to_end(
                            dataset, processor, args.batch_size, w, model, folder / f"cache-{next(caches)}"
                        )
                    )
                    for w in NEW
                },
            },
        }
        rates = {kind: {name: [] for name in group} for kind, group in paths.items()}
        cpu_main = {kind: {name: [] for name in group} for kind, group in paths.items()}
        cpu_workers = {kind: {name: [] for name in group} for kind, group in paths.items()}
        ceiling = {1: [], 2: []}
        loads, decodes = [], {}
        for round_ in range(args.rounds):
            for kind, group in paths.items():
                order = list(group) if round_ % 2 == 0 else list(reversed(group))
                for name in order:
                    with DecodeCounter(folder / "decodes.txt") as counter:
                        (main_before, workers_before), start = cpu_seconds(), time.perf_counter()
                        group[name]()
                        elapsed = time.perf_counter() - start
                        main_after, workers_after = cpu_seconds()
                    rates[kind][name].append(len(names) / elapsed)
                    cpu_main[kind][name].append((main_after - main_before) / len(names) * 1e3)
                    cpu_workers[kind][name].append((workers_after - workers_before) / len(names) * 1e3)
                    if kind == "data":
                        decodes[name] = counter.per_image()
                    print(
                        f"round {round_ + 1}, {kind}: {name}: {rates[kind][name][-1]:.1f} images/s "
                        f"(CPU ms/image: main {cpu_main[kind][name][-1]:.2f}, workers "
                        f"{cpu_workers[kind][name][-1]:.2f})",
                        flush=True,
                    )
            for processes in (1, 2) if round_ % 2 == 0 else (2, 1):
                ceiling[processes].append(control(processes, work))
            loads.append(os.getloadavg()[0])
            print(
                f"round {round_ + 1}: control {ceiling[2][-1] / ceiling[1][-1]:.2f}x with 2 processes, "
                f"load {loads[-1]:.2f}",
                flush=True,
            )
        steps = breakdown(folder, names, processor)
        matched = parity(processor, [folder / name for name in names[:64]])

    def medians(table):
        return {
            kind: {name: round(statistics.median(values), 2) for name, values in group.items()}
            for kind, group in table.items()
        }

    median = medians(rates)
    cpu_total = {
        name: round(statistics.median([m + w for m, w in zip(cpu_main["data"][name], cpu_workers["data"][name])]), 2)
        for name in rates["data"]
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            **info,
            "load_average_per_round": [round(x, 2) for x in loads],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "images": len(names),
        "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "images_per_s_median": median,
        "images_per_s_all_rounds": {
            kind: {name: [round(v, 1) for v in values] for name, values in group.items()}
            for kind, group in rates.items()
        },
        "cpu_ms_per_image_median": {
            "main": medians(cpu_main),
            "workers": medians(cpu_workers),
            "data_path_total": cpu_total,
        },
        "machine_scaling_ceiling_all_rounds": [round(b / a, 2) for a, b in zip(ceiling[1], ceiling[2])],
        **ratios(rates, cpu_total, [b / a for a, b in zip(ceiling[1], ceiling[2])]),
        "decodes": decodes,
        "single_thread_cpu_ms_per_image": steps,
        "parity_new_vs_old_preprocessing": matched,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if Path(args.output).resolve() == common.CACHE_RESULTS.resolve():
        common.update_cache_figures()  # results.json holds the figures of every benchmark
    print(json.dumps({key: value for key, value in result.items() if "all_rounds" not in key}, indent=2))


if __name__ == "__main__":
    main()
