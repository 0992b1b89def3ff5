"""The image-feature cache: each image encoded once, sharded across ranks, checked on reuse."""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from transformers.utils import logging

from ..backbones.fast_tower import CNN_CHUNK, for_inference, is_cnn
from ..training.checkpoints import file_problem, file_record
from .cleaning import image_entries, load_or_reason, skip_unreadable


logger = logging.get_logger(__name__)


def vision_cache_key(model, processor) -> str:
    """Changes whenever the cached features would: vision weights, features taken, preprocessing."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    config = model.config
    digest.update(f"{config.vision_feature_type}:{config.vision_feature_layer}".encode())
    if config.vision_feature_type == "grid":  # added only here, so that the other layouts' caches stay valid
        digest.update(f":{config.vision_grid_size}".encode())
    digest.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def image_content_key(dataset: Dataset) -> str:
    """A digest of the images row by row, so that a photo replaced under the same name gets new
    features: the SHA-256 of a row's bytes, or of a path-only row's path, size, mtime and ctime (not
    its content, which would read every file; unlike mtime, no copy tool can set ctime back)."""
    digest = hashlib.sha256()
    for data, path in image_entries(dataset):
        if data is not None:
            digest.update(hashlib.sha256(data).digest())
        elif path is not None:
            try:
                stat = os.stat(path)
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}".encode())
            except OSError:  # missing now: encoding will say so, naming the file
                digest.update(f"{path}:missing".encode())
        else:
            digest.update(b"none")
    return digest.hexdigest()


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (DDP ranks): `rank` of `world_size`, `local_rank` on its
    machine, and `barrier`, which waits for all of them (None in a one-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] | None = None


# Bumped when the cache file's layout or meaning changes, so an old file is never read as a new one.
_CACHE_LAYOUT = "features+unreadable/2"


def add_vision_features(
    dataset: Dataset,
    model,
    processor,
    cache_dir: str | Path,
    batch_size: int = 64,
    *,
    split: str = "train",
    num_workers: int | None = None,
    drop_unreadable: bool = True,
    processes: Processes = Processes(),
) -> Dataset:
    """Replace the `image` column by frozen image-tower features (`vision_embeds`), one encoding per image.

    The Arrow file is keyed by the vision weights, the preprocessing, the rows (datasets'
    fingerprint) and the images' content, and used only if it matches its manifest (size, SHA-256).
    Its pass is the unreadable-image check: a refused image is dropped and logged as
    `drop_unreadable_images` does (`drop_unreadable=False`: it stops the run), its reason cached so
    that reruns log it too. `num_workers` DataLoader processes decode while this one runs the tower;
    the features do not depend on their number. With `processes.world_size` > 1 each rank encodes its shard of
    whole batches into its own file and, past the barrier, reads all shards; where `cache_dir` is not shared,
    each machine's `local_rank` 0 encodes the shards its disk lacks."""
    key = f"{vision_cache_key(model, processor)}:{dataset._fingerprint}:{image_content_key(dataset)}:{_CACHE_LAYOUT}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    rank, world_size = processes.rank, processes.world_size

    def encode(shard: int | None, target: Path):
        """Encode shard `shard` of `world_size` (None: every row) into `target`."""
        discard_damaged_cache(target)
        if shard is None:
            start, stop = 0, len(dataset)
        else:
            start, stop = _shard_bounds(len(dataset), shard, world_size, batch_size)
            message = "%s: rank %d of %d encodes rows %d to %d (%d images) into %s"
            logger.info(message, split, rank, world_size, start, stop - 1, stop - start, target.name)
        _encode_to_file(dataset, range(start, stop), model, processor, target, batch_size, num_workers, split)

    files = _feature_files(cache_dir, fingerprint, split, processes, encode)
    if world_size > 1:
        message = "%s: rank %d of %d reads the feature cache: %d images from %d file(s)"
        logger.info(message, split, rank, world_size, len(dataset), len(files))
    return _join_features(dataset, files, split, drop_unreadable)


def _feature_files(cache_dir: Path, fingerprint: str, split: str, processes: Processes, encode) -> list[Path]:
    """The cache's complete files for `fingerprint`, after this process encoded its part where they were missing
    (one file, or with several processes one shard per rank, past the barrier the shards another machine wrote)."""
    rank, world_size, barrier = processes.rank, processes.world_size, processes.barrier
    files = _complete_cache(cache_dir, fingerprint)
    if files is None:  # build this process's part: its shard, or every row where it is the only process
        if world_size > 1:
            target = _shard_file(cache_dir, fingerprint, rank, world_size)
            if not _is_valid(target):
                encode(rank, target)
        else:
            files = [cache_dir / f"vision-features-{fingerprint}.arrow"]
            encode(None, files[0])  # recorded in its manifest as it is written: no need to read it again
    if world_size > 1 and barrier is not None:
        barrier()  # every rank, whether it built or reused: the number of barriers never depends on the files
        files = files or _complete_cache(cache_dir, fingerprint, world_size)
        # Another node's shards are missing where the folder is not shared between machines: each node's first
        # process encodes them on its own disk, one writer per file, while the node's other processes wait.
        if files is None and processes.local_rank == 0:
            for other in range(world_size):
                shard = _shard_file(cache_dir, fingerprint, other, world_size)
                if not _is_valid(shard):
                    logger.info(
                        "%s: %s is not in %s (a folder not shared with the other machines); encoding it here too",
                        split,
                        shard.name,
                        cache_dir,
                    )
                    encode(other, shard)
        barrier()
    files = files or _complete_cache(cache_dir, fingerprint, world_size)
    if files is None:
        raise RuntimeError(
            f"The feature cache for {split} in {cache_dir} is incomplete or damaged after every "
            f"process wrote its part (key {fingerprint}). Give every process of a machine the "
            "same --feature_cache_dir."
        )
    return files


def _join_features(dataset: Dataset, files: list[Path], split: str, drop_unreadable: bool) -> Dataset:
    """`dataset` with its `image` column replaced by the cached features, unreadable images dropped (or refused)."""
    parts = [Dataset.from_file(str(file)) for file in files]
    # a shard may be empty
    features = datasets.concatenate_datasets([part for part in parts if len(part)] or parts[:1])
    if len(features) != len(dataset):
        raise RuntimeError(f"The feature cache {files[0]} has {len(features)} rows for {len(dataset)} images.")
    rest = dataset.with_format(None).remove_columns("image")
    if rest._indices is not None:
        rest = rest.flatten_indices(keep_in_memory=True)  # a small table (ids, captions); axis=1 needs no mapping
    merged = datasets.concatenate_datasets([features, rest], axis=1)
    reasons = features["unreadable"]
    first_bad = next((reason for reason in reasons if reason), None)
    if first_bad and not drop_unreadable:
        raise ValueError(f"{split}: {first_bad} (With the image check off, an unreadable image stops the run.)")
    merged = skip_unreadable(merged, reasons, split).remove_columns("unreadable")
    return merged.with_format("numpy", columns=["vision_embeds"], output_all_columns=True)


def _shard_bounds(rows: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank`'s shard: whole batches, dealt as contiguous `Dataset.shard`
    deals rows, so that each image is encoded in the same batch whatever the number of processes
    (the tower's last bits can depend on the batch) and the merged cache is bit-identical."""
    batches = -(-rows // batch_size)
    size, extra = divmod(batches, world_size)
    start = rank * size + min(rank, extra)
    return min(start * batch_size, rows), min((start + size + (rank < extra)) * batch_size, rows)


def _shard_file(cache_dir: Path, fingerprint: str, index: int, count: int) -> Path:
    return cache_dir / f"vision-features-{fingerprint}-shard-{index}-of-{count}.arrow"


def _complete_cache(cache_dir: Path, fingerprint: str, prefer: int | None = None) -> list[Path] | None:
    """The files holding the features for `fingerprint`, in row order, if a complete set of them is valid (manifest
    matches): the single file, or all n shards of some n (`prefer` tried first). Nothing is deleted here: other
    processes may be writing their shards."""
    whole = cache_dir / f"vision-features-{fingerprint}.arrow"
    if _is_valid(whole):
        return [whole]
    counts = {
        int(path.name.rsplit("-of-", 1)[1].split(".")[0])
        for path in cache_dir.glob(f"vision-features-{fingerprint}-shard-*-of-*.arrow")
    }
    for count in sorted(counts, key=lambda n: n != prefer):
        shards = [_shard_file(cache_dir, fingerprint, i, count) for i in range(count)]
        if all(_is_valid(shard) for shard in shards):
            return shards
    return None


def _is_valid(cache_file: Path) -> bool:
    return _cache_problem(cache_file) is None


def _cache_problem(cache_file: Path) -> str | None:
    """What makes `cache_file` other than exactly what was written (its manifest: size and SHA-256), or None."""
    try:
        record = json.loads(_manifest(cache_file).read_text())
    except (OSError, ValueError):
        return "it has no readable manifest, so its content cannot be checked"
    return file_problem(cache_file, record)


# Images one worker decodes at a time: small enough for workers to share a tower batch, large enough
# that handing chunks over costs little.
DECODE_CHUNK = 16


class _DecodedChunks(torch.utils.data.Dataset):
    """Chunk i of the rows: (its batch, last chunk of it?, pixel values of its readable images or
    None, reasons per row, "" if readable), at most `DECODE_CHUNK` rows of one batch. Each image is
    decoded once by `load_image` and preprocessed as the processor does; CLIP's recipe gives
    8-bit crops (a quarter of the bytes to hand over), normalised where the tower runs."""

    def __init__(self, raw: Dataset, processor, rows: range, batch_size: int, chunk: int | None = None):
        self.raw, self.processor = raw, processor
        self.fast = processor.clip_pixels  # None: not CLIP's recipe, the processor's own call instead
        chunk = chunk or DECODE_CHUNK
        self.chunks = []
        for batch, start in enumerate(range(rows.start, rows.stop, batch_size)):
            stop = min(start + batch_size, rows.stop)
            self.chunks += [
                (batch, range(first, min(first + chunk, stop)), first + chunk >= stop)
                for first in range(start, stop, chunk)
            ]
        self.batches = -(-len(rows) // batch_size)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        batch, rows, last = self.chunks[index]
        block = self.raw[rows.start : rows.stop]
        loaded = [load_or_reason(entry, image_id) for entry, image_id in zip(block["image"], block["image_id"])]
        images = [image for image, _ in loaded if image is not None]
        reasons = [reason for _, reason in loaded]
        if not images:
            return batch, last, None, reasons
        return batch, last, self.fast.crops(images) if self.fast else pixel_values(images, self.processor), reasons


def pixel_values(images: list, processor) -> torch.Tensor:
    """The processor's pixel values of `images`, without its text."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _as_is(item):
    return item


def _one_thread(_worker):
    torch.set_num_threads(1)  # each worker is one core's worth of decoding; the vision tower has the main process


def _decoding_loader(dataset: Dataset, processor, rows: range, batch_size: int, num_workers: int | None):
    """(`_DecodedChunks` of `rows`, the DataLoader that yields them in row order from `num_workers` processes, or
    from this one for 0/None): the decode-once pass's input, its images read raw and decoded by `load_image`."""
    raw = dataset.with_format(None).select_columns(["image", "image_id"])
    raw = raw.cast_column("image", datasets.Image(decode=False))
    chunks = _DecodedChunks(raw, processor, rows, batch_size)
    workers = max(0, num_workers or 0)
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    return chunks, loader


@torch.no_grad()
def _encode_to_file(
    dataset: Dataset,
    rows: range,
    model,
    processor,
    cache_file: Path,
    batch_size: int,
    num_workers: int | None,
    split: str = "train",
) -> None:
    """Encode `rows` of `dataset` into `cache_file` (columns `vision_embeds`, zeros for an unreadable image, and
    `unreadable`, its reason or ""), written under a temporary name and renamed, then its manifest."""
    from datasets.arrow_writer import ArrowWriter

    batches, loader = _decoding_loader(dataset, processor, rows, batch_size, num_workers)
    device = next(model.model.vision_tower.parameters()).device
    fast = batches.fast  # the recipe the workers crop by: the main process finishes it (normalise)
    temporary = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
    shape = None
    tower = model.get_encoder(modality="image")
    was_training = tower.training
    tower.eval()  # the cache holds inference features: a BatchNorm tower in training mode uses batch statistics
    model.model.vision_tower = for_inference(tower)  # swapped back below; the model's own tower is untouched
    chunk = CNN_CHUNK if is_cnn(tower) else batch_size
    try:
        empty = datasets.Features(
            {"vision_embeds": datasets.List(datasets.Value("float32")), "unreadable": datasets.Value("string")}
        )
        with ArrowWriter(path=str(temporary), features=None if len(rows) else empty) as writer:
            # updated by hand: tqdm around a DataLoader with workers started it twice, decoding
            # every image twice (torch 2.13 / tqdm 4)
            workers = loader.num_workers or "no"
            progress = datasets.utils.tqdm(
                total=batches.batches, unit="batch", desc=f"image features, {split} ({workers} decoding worker(s))"
            )
            pixels, reasons = [], []
            for _, last, chunk_pixels, chunk_reasons in loader:  # in row order whatever the number of workers
                pixels += [chunk_pixels] if chunk_pixels is not None else []
                reasons += chunk_reasons
                if not last:
                    continue
                embeds = None  # one batch of the vision tower: the same rows whatever the number of workers
                if pixels:
                    pixels = torch.cat(pixels).to(device)
                    pixels = fast.normalise(pixels) if pixels.dtype == torch.uint8 else pixels  # 8-bit crops
                    embeds = torch.cat([model.get_vision_embeds(part) for part in pixels.split(chunk)])
                    embeds = embeds.float().cpu().numpy()
                    shape = embeds.shape[1:]
                if shape is None:  # no readable image yet: the shape of one, from a blank input
                    crop = pixel_values([PILImage.new("RGB", (8, 8))], processor)
                    shape = model.get_vision_embeds(crop.to(device)).shape[1:]
                out = np.zeros((len(reasons), *shape), dtype=np.float32)
                if embeds is not None:
                    out[[i for i, reason in enumerate(reasons) if not reason]] = embeds
                writer.write_batch({"vision_embeds": out, "unreadable": reasons})
                pixels, reasons = [], []
                progress.update(1)
            progress.close()
            writer.finalize()
        os.replace(temporary, cache_file)
    finally:
        model.model.vision_tower = tower
        tower.train(was_training)
        temporary.unlink(missing_ok=True)
    _write_manifest(cache_file)


def _manifest(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".manifest.json")


def _write_manifest(cache_file: Path) -> None:
    manifest = file_record(cache_file)
    temporary = _manifest(cache_file).with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, _manifest(cache_file))


def discard_damaged_cache(cache_file: Path) -> None:
    """Remove a cache file that is not exactly what was written (no manifest, another size, another SHA-256), with
    a log line naming it, so that it is built again. datasets would otherwise memory-map a truncated file and fail
    mid-run, or read a damaged one without noticing."""
    if not cache_file.exists():
        _manifest(cache_file).unlink(missing_ok=True)
        return
    problem = _cache_problem(cache_file)
    if problem is None:
        return
    logger.warning("Feature cache %s is damaged (%s); rebuilding it.", cache_file, problem)
    cache_file.unlink()
    _manifest(cache_file).unlink(missing_ok=True)
