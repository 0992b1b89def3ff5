"""Captioning data: load any source into one layout, drop unreadable images up front, cache CLIP features.

Every source becomes a `DatasetDict` with the splits it has (`train`, `validation`, `test`) and three columns:
`image_id` (str), `image` (datasets `Image()`), `captions` (list of str, all references of that image).

Sources:
- a Hub data set (`dataset_name`), e.g. Flickr30K's parquet conversion; a column holding the Karpathy split
  (`train` / `val` / `test`) partitions it (datasets >= 4 cannot run the old loading scripts);
- `embedded`: the generated shapes data set that ships with the project (clipqwen.embedded);
- JSONL or CSV annotation files with an image-path column (paths relative to the file, kept inside it);
  rows with one caption each are grouped per image;
- imagefolder directories with a `metadata.jsonl` (`file_name` + captions).
"""

import csv
import hashlib
import io
import json
import logging
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback

from .images import ImageLoadError, load_image

logger = logging.getLogger(__name__)

# Karpathy's split of Flickr30K (images per split), as nlphuji/flickr30k's `split` column holds it.
KARPATHY_FLICKR30K = {"train": 29000, "validation": 1014, "test": 1000}
SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation", "test": "test"}


# ---- loading ------------------------------------------------------------------------------------------
def load_caption_data(args, cache_dir: str | None = None) -> DatasetDict:
    """Load the data named by `DataTrainingArguments` and return it in the common layout."""
    if args.dataset_name == "embedded":
        from .embedded import load_embedded_dataset

        return load_embedded_dataset()
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    dirs = {"train": args.train_dir, "validation": args.validation_dir, "test": args.test_dir}
    if any(files.values()):
        return DatasetDict({split: read_annotation_file(path, args.image_column, args.caption_column, args.id_column)
                            for split, path in files.items() if path})
    if any(dirs.values()):
        raw = {split: datasets.load_dataset("imagefolder", data_dir=path, split="train", cache_dir=cache_dir)
               for split, path in dirs.items() if path}
        return DatasetDict({split: standardise(ds, args.image_column, args.caption_column, args.id_column, source=dirs[split])
                            for split, ds in raw.items()})
    raw = load_hub_dataset(args.dataset_name, args.dataset_config_name, args.dataset_revision, cache_dir)
    if args.split_column:
        raw = split_by_column(raw, args.split_column, args.dataset_name)
        if args.dataset_name == "nlphuji/flickr30k":
            check_split_sizes(raw, KARPATHY_FLICKR30K, f"{args.dataset_name}@{args.dataset_revision}")
    return DatasetDict({split: standardise(ds, args.image_column, args.caption_column, args.id_column, source=args.dataset_name)
                        for split, ds in raw.items()})


def load_hub_dataset(name, config_name, revision, cache_dir):
    try:
        return datasets.load_dataset(name, config_name, revision=revision, cache_dir=cache_dir)
    except (ConnectionError, OSError, FileNotFoundError) as error:
        raise SystemExit(
            f"Could not load the data set {name!r} (revision {revision!r}): {error}\n"
            "Without access to the Hugging Face Hub, use local data instead: --train_file/--validation_file/"
            "--test_file (JSONL or CSV with an image path column), --train_dir/--validation_dir/--test_dir "
            "(imagefolder with metadata.jsonl), a local folder of parquet files as --dataset_name, or "
            "--dataset_name embedded for the built-in offline data set."
        ) from error


def split_by_column(raw: DatasetDict, column: str, source: str) -> DatasetDict:
    """Flickr30K's Karpathy split lives in a column of one big split; turn its values into real splits."""
    everything = datasets.concatenate_datasets(list(raw.values()))
    check_columns(everything.column_names, [column], source, "--split_column")
    values = everything.unique(column)
    unknown = [value for value in values if value not in SPLIT_ALIASES]
    if unknown:
        raise ValueError(f"{source}: column {column!r} holds {unknown}; expected split names among {sorted(SPLIT_ALIASES)}.")
    labels = everything[column]
    return DatasetDict({
        SPLIT_ALIASES[value]: everything.select([i for i, label in enumerate(labels) if label == value]).remove_columns(column)
        for value in values
    })


def check_split_sizes(raw: DatasetDict, expected: dict[str, int], source: str) -> None:
    """Warn when a known data set's splits do not have their published sizes: another revision or a re-conversion
    changed the data, and scores are then not comparable with published ones."""
    found = {split: len(dataset) for split, dataset in raw.items()}
    if found != expected:
        logger.warning("%s has splits of %s images, not the Karpathy split's %s: the data differ from the published "
                       "split, so scores are not comparable with published ones. Pin --dataset_revision to a commit whose "
                       "data you checked.", source, found, expected)


def check_columns(available: list[str], columns, source, flag: str = "--image_column/--caption_column"):
    missing = [column for column in columns if column not in available]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {list(available)}. "
            f"Name the right ones with {flag}."
        )


def standardise(dataset: Dataset, image_column: str, caption_column: str, id_column: str | None, source: str) -> Dataset:
    """Rename to image / captions / image_id; a single caption string becomes a one-element list."""
    if caption_column not in dataset.column_names and caption_column == "captions" and "text" in dataset.column_names:
        caption_column = "text"  # imagefolder's usual single-caption column
    if id_column is None and "filename" in dataset.column_names:
        id_column = "filename"  # Flickr30K's image names, more useful in predictions than row numbers
    check_columns(dataset.column_names, [image_column, caption_column] + ([id_column] if id_column else []), source)
    keep = {image_column: "image", caption_column: "captions"}
    if id_column:
        keep[id_column] = "image_id"
    dataset = dataset.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{i:06d}" for i in range(len(dataset))])
    if dataset.features["image_id"].dtype != "string":
        dataset = dataset.cast_column("image_id", datasets.Value("string"))

    if isinstance(dataset.features["captions"], datasets.Value):  # one caption per image: make it a list
        dataset = dataset.map(lambda caption: {"captions": [caption]}, input_columns="captions", desc="captions as lists",
                              features=datasets.Features({**dataset.features, "captions": datasets.List(datasets.Value("string"))}))
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def read_annotation_file(path: str, image_column: str, caption_column: str, id_column: str | None) -> Dataset:
    """JSONL or CSV rows → one row per image with all its captions. Image paths are relative to the file's
    folder and must stay inside it (no absolute paths, `..` or symlinks out)."""
    path = Path(path)
    root = path.parent.resolve()
    rows = list(_read_rows(path))
    if not rows:
        raise ValueError(f"{path} has no rows.")
    check_columns(list(rows[0][1]), [image_column, caption_column] + ([id_column] if id_column else []), path)
    grouped: dict[str, dict] = {}
    for line, row in rows:
        image = resolve_inside(root, row.get(image_column), f"{path}, row {line}")
        captions = row.get(caption_column)
        captions = [captions] if isinstance(captions, str) else list(captions or [])
        entry = grouped.setdefault(image, {"image_id": str(row[id_column]) if id_column else Path(image).name,
                                           "image": image, "captions": []})
        entry["captions"].extend(str(c) for c in captions)
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string"))})
    return Dataset.from_list(list(grouped.values()), features=features)


def _read_rows(path: Path):
    """(line number, row) pairs; a decoding or syntax error names the row instead of a byte offset."""
    data = path.read_bytes()
    if path.suffix.lower() == ".csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line}: not valid UTF-8 ({error.reason}). Re-save the file as UTF-8.") from None
        for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield number, row
        return
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, row {number}: not valid UTF-8 ({error.reason}). Re-save the file as UTF-8.") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, row {number}: not valid JSON ({error.msg}).") from None


def resolve_inside(root: Path, value, where: str) -> str:
    """An annotation's image path, resolved against `root` and refused if it points outside it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: the image path is empty.")
    if Path(value).is_absolute():
        raise ValueError(f"{where}: absolute image path {value!r} refused; give paths relative to the annotation file.")
    resolved = (root / value).resolve()  # follows symlinks, so a link pointing out is caught too
    if not resolved.is_relative_to(root):
        raise ValueError(f"{where}: image path {value!r} leads outside {root}; refused.")
    return str(resolved)


# ---- cleaning ------------------------------------------------------------------------------------------
def drop_unreadable_images(dataset: Dataset, split: str, num_proc: int | None = None) -> Dataset:
    """Decode every image once before training; drop and log the ones that fail, so that a corrupt file is
    a line in the log instead of a crash mid-epoch. The result is cached by datasets like any map."""

    def reasons(batch):
        found = []
        for entry, image_id in zip(batch["image"], batch["image_id"]):
            try:
                load_image(entry, name=entry.get("path") or image_id)
                found.append("")
            except ImageLoadError as error:
                found.append(str(error))
        return {"unreadable": found}

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    checked = raw.map(reasons, batched=True, batch_size=64, num_proc=num_proc, desc=f"checking {split} images")
    bad = [(i, reason) for i, reason in enumerate(checked["unreadable"]) if reason]
    if bad:
        logger.warning("%s: skipping %d unreadable image(s) of %d:\n%s", split, len(bad), len(dataset),
                       "\n".join(f"  {reason}" for _, reason in bad))
        keep = sorted(set(range(len(dataset))) - {i for i, _ in bad})
        dataset = dataset.select(keep)
    return dataset


def remove_empty_captions(dataset: Dataset, split: str) -> Dataset:
    """Blank captions teach nothing (and would be an EOS-only target); images left with none are dropped."""
    def clean(batch):  # NUL bytes and surrounding whitespace are never part of a caption
        return {"captions": [[c.replace("\x00", "").strip() for c in caps if c and c.replace("\x00", "").strip()]
                             for caps in batch["captions"]]}

    cleaned = dataset.map(clean, batched=True, desc=f"cleaning {split} captions")
    empty = sum(1 for caps in cleaned["captions"] if not caps)
    if empty:
        logger.warning("%s: dropping %d image(s) without a non-empty caption.", split, empty)
        cleaned = cleaned.filter(lambda caps: len(caps) > 0, input_columns="captions")
    return cleaned


def expand_captions(dataset: Dataset) -> Dataset:
    """One row per (image, caption): the 'all captions' mode, and deterministic validation losses."""
    def expand(batch):
        out = {key: [] for key in batch}
        out["caption"] = []
        for i, captions in enumerate(batch["captions"]):
            for caption in captions:
                for key in batch:
                    out[key].append(batch[key][i])
                out["caption"].append(caption)
        return out

    return dataset.map(expand, batched=True, desc="one row per caption")


def add_caption_lengths(dataset: Dataset, tokenizer) -> Dataset:
    """A `length` column for Trainer's `--train_sampling_strategy group_by_length`: batches of similar caption
    lengths pad less. Per pair its caption's tokens; per image (random-caption mode) the mean of its captions."""
    def lengths(batch):
        texts = [str(t) for t in (batch["caption"] if "caption" in batch else [c for row in batch["captions"] for c in row])]
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if "caption" in batch:
            return {"length": counts}
        out, start = [], 0
        for row in batch["captions"]:
            out.append(round(sum(counts[start:start + len(row)]) / len(row)))
            start += len(row)
        return {"length": out}

    return dataset.map(lengths, batched=True, desc="caption lengths")


# ---- CLIP feature cache --------------------------------------------------------------------------------
def vision_cache_key(model, processor) -> str:
    """Changes whenever the cached features would: the vision weights, which features are taken, and the
    image preprocessing. Hashing CLIP-B/32's 88 M weights takes about a second."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    config = model.config
    digest.update(f"{config.vision_feature_type}:{config.vision_feature_layer}".encode())
    digest.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def add_vision_features(dataset: Dataset, model, processor, cache_dir: str | Path, batch_size: int = 64) -> Dataset:
    """Replace the `image` column by the frozen CLIP output (`vision_embeds`), computed once per image and
    stored in an Arrow file keyed by the vision weights, the preprocessing and the data. Training from it never
    decodes an image again, and each image is encoded once however many captions or epochs it has."""
    fingerprint = hashlib.sha256(f"{vision_cache_key(model, processor)}:{dataset._fingerprint}".encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.vision_model.parameters()).device

    @torch.no_grad()
    def encode(batch):  # the processor's own image path (RGB conversion, aspect-ratio bound), as in training from pixels
        images = [load_image(entry, name=entry.get("path") or "image") for entry in batch["image"]]
        pixel_values = processor.preprocess_images(images)
        return {"vision_embeds": model.get_vision_embeds(pixel_values.to(device)).float().cpu().numpy()}

    with_images = dataset.cast_column("image", datasets.Image(decode=False))
    return with_images.map(
        encode, batched=True, batch_size=batch_size, remove_columns=["image"],
        cache_file_name=str(cache_dir / f"vision-features-{fingerprint}.arrow"), new_fingerprint=fingerprint,
        desc="CLIP features (cached)",
    ).with_format("numpy", columns=["vision_embeds"], output_all_columns=True)


# ---- batching --------------------------------------------------------------------------------------------
class CaptionCollator:
    """Rows → model inputs. A row with `caption` (expanded mode) uses it; otherwise one of its `captions` is
    drawn at random each time the row is seen: a fresh caption per image per epoch. The draw depends only on
    (seed, epoch, image id) — not on a global RNG, which data-loader prefetching advances ahead of the step a
    checkpoint records — so a resumed run draws exactly what an uninterrupted one would. `CaptionEpochCallback`
    keeps `epoch` current. Without captions (`for_generation`) it builds left-padded prompts for `generate()`."""

    def __init__(self, processor, max_caption_length: int | None = None, for_generation: bool = False, prompt: str = "",
                 seed: int = 0):
        self.processor = processor
        self.max_caption_length = max_caption_length
        self.for_generation = for_generation
        self.prompt = prompt
        self.seed = seed
        self.epoch = 0

    def pick_caption(self, row: dict) -> str:
        if "caption" in row:
            return row["caption"]
        return random.Random(f"{self.seed}:{self.epoch}:{row['image_id']}").choice(row["captions"])

    def __call__(self, rows: list[dict]) -> dict:
        captions = None
        if not self.for_generation:
            captions = [self.pick_caption(row) for row in rows]
        prompts = [self.prompt] * len(rows)
        if "vision_embeds" in rows[0]:
            batch = self.processor(text=prompts, captions=captions, max_caption_length=self.max_caption_length)
            batch["vision_embeds"] = torch.as_tensor(np.stack([row["vision_embeds"] for row in rows]))
        else:
            batch = self.processor(images=[row["image"] for row in rows], text=prompts, captions=captions,
                                   max_caption_length=self.max_caption_length)
        if self.for_generation:
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows])
        return batch


class CaptionEpochCallback(TrainerCallback):
    """Tells the collator which epoch it is batching, for its per-epoch caption draw."""

    def __init__(self, collator: CaptionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
