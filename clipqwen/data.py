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

Whatever the source, the same guards apply (docs/reliability.md): every image reference goes through one resolver
(`resolve_inside`: inside the source's root, symlinks resolved), captions must be strings (`caption_list`), a split
left without images is an error (`require_images`), and images are decoded only by `clipqwen.images.load_image`
(`with_checked_images`), also when the collator reads them during training.
"""

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from PIL import Image as PILImage
from transformers import TrainerCallback

from .checkpoints import sha256_of
from .images import ClipPixels, ImageLoadError, load_image, pixel_values, regular_file_size


logger = logging.getLogger(__name__)

# Karpathy's split of Flickr30K (images per split), as nlphuji/flickr30k's `split` column holds it.
KARPATHY_FLICKR30K = {"train": 29000, "validation": 1014, "test": 1000}
SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "dev": "validation", "test": "test"}


# ---- loading ------------------------------------------------------------------------------------------
def load_caption_data(args, cache_dir: str | None = None) -> DatasetDict:
    """Load the data named by `DataTrainingArguments` and return it in the common layout, each split through the
    same guards: image references checked against the source's root, captions checked to be strings, images
    decoded through `load_image`."""
    loaded = {}  # split -> (dataset, source named in messages, root its image paths must stay inside, or None)
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    dirs = {"train": args.train_dir, "validation": args.validation_dir, "test": args.test_dir}
    if args.dataset_name == "embedded":
        from .embedded import load_embedded_dataset

        loaded = {split: (dataset, "embedded", None) for split, dataset in load_embedded_dataset().items()}
    elif any(files.values()):
        loaded = {split: (read_annotation_file(path, args.image_column, args.caption_column, args.id_column), path,
                          Path(path).parent) for split, path in files.items() if path}
    elif any(dirs.values()):
        loaded = {split: (standardise(load_image_folder(path, args.caption_column, cache_dir), args.image_column,
                                      args.caption_column, args.id_column, source=path, split=split), path, Path(path))
                  for split, path in dirs.items() if path}
    else:
        raw = load_hub_dataset(args.dataset_name, args.dataset_config_name, args.dataset_revision, cache_dir,
                               one_split=bool(args.split_column))
        if args.split_column:
            raw = split_by_column(raw, args.split_column, args.dataset_name)
            if args.dataset_name == "nlphuji/flickr30k":
                check_split_sizes(raw, KARPATHY_FLICKR30K, f"{args.dataset_name}@{args.dataset_revision}")
        root = dataset_root(args.dataset_name)
        loaded = {split: (standardise(ds, args.image_column, args.caption_column, args.id_column,
                                      source=args.dataset_name, split=split), args.dataset_name, root)
                  for split, ds in raw.items()}
    return DatasetDict({split: with_checked_images(check_image_references(dataset, root, source, split))
                        for split, (dataset, source, root) in loaded.items()})


def dataset_root(name: str) -> Path:
    """Where the files of a data set given by `--dataset_name` live: the folder itself for a local one; for a Hub
    one, its repository's folder in the huggingface_hub cache, where `load_dataset` downloads every file it ships
    (imagefolder-style repositories give rows that are paths into it)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset")


def load_image_folder(folder: str, caption_column: str, cache_dir: str | None = None) -> Dataset:
    """Every image of `folder` (described by its metadata.jsonl) as one split, whatever the files are called.
    `load_dataset("imagefolder", data_dir=folder)` infers splits from file names: `validation_00001.png` makes a
    validation split (and no train split), and a folder mixing `test_*.jpg` with other names is cut in two. Listing
    the files as `data_files` of one split leaves the split to the flag that named the folder."""
    check_metadata_captions(Path(folder), caption_column)
    files = {"train": glob.escape(str(folder)) + "/**"}  # glob.escape: a folder named like a pattern ("[1]") is a name
    return datasets.load_dataset("imagefolder", data_files=files, split="train", cache_dir=cache_dir)


def check_metadata_captions(folder: Path, caption_column: str) -> None:
    """The captions of an imagefolder's metadata.jsonl files, checked row by row before datasets reads them (its
    JSON reader would make dicts into structs and fail on mixed types with an Arrow error naming no file)."""
    for path in sorted(folder.rglob("metadata.jsonl")):
        for line, row in _read_rows(path):
            key = caption_column if caption_column in row or caption_column != "captions" else "text"  # as standardise
            caption_list(row.get(key), f"{path}, row {line}")


def load_hub_dataset(name, config_name, revision, cache_dir, one_split: bool = False):
    """A Hub data set, or a local folder of data files. With `one_split` (the split comes from a column), every parquet
    file of a local folder is read as one split: datasets would otherwise infer splits from file names, and a folder
    holding `0000.parquet` beside `test-0000.parquet` would lose every file whose name names no split."""
    local = one_split and Path(name).is_dir()
    parquet = sorted(str(path) for path in Path(name).glob("**/*.parquet")) if local else []
    try:
        if parquet:
            return datasets.load_dataset("parquet", data_files={"train": parquet}, cache_dir=cache_dir)
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
        raise ValueError(f"{source}: column {column!r} holds {unknown}; expected split names among "
                         f"{sorted(SPLIT_ALIASES)}.")
    labels = everything[column]
    return DatasetDict({
        SPLIT_ALIASES[value]: everything.select([i for i, label in enumerate(labels) if label == value])
        .remove_columns(column)
        for value in values
    })


def check_split_sizes(raw: DatasetDict, expected: dict[str, int], source: str) -> None:
    """Warn when a known data set's splits do not have their published sizes: another revision or a re-conversion
    changed the data, and scores are then not comparable with published ones."""
    found = {split: len(dataset) for split, dataset in raw.items()}
    if found != expected:
        logger.warning("%s has splits of %s images, not the Karpathy split's %s: the data differ from the published "
                       "split, so scores are not comparable with published ones. Pin --dataset_revision to a commit "
                       "whose data you checked.", source, found, expected)


def check_columns(available: list[str], columns, source, flag: str = "--image_column/--caption_column"):
    missing = [column for column in columns if column not in available]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {list(available)}. "
            f"Name the right ones with {flag}."
        )


def standardise(dataset: Dataset, image_column: str, caption_column: str, id_column: str | None, source: str,
                split: str = "train") -> Dataset:
    """Rename to image / captions / image_id; a single caption string becomes a one-element list. Captions that are
    not strings are refused, naming the row."""
    if caption_column not in dataset.column_names and caption_column == "captions" and "text" in dataset.column_names:
        caption_column = "text"  # imagefolder's usual single-caption column
    if id_column is None and "filename" in dataset.column_names:
        id_column = "filename"  # Flickr30K's image names, more useful in predictions than row numbers
    check_columns(dataset.column_names, [image_column, caption_column] + ([id_column] if id_column else []), source)
    keep = {image_column: "image", caption_column: "captions"}
    if id_column:
        keep[id_column] = "image_id"
    dataset = dataset.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
    if id_column:  # each row is one image here: an id twice would mix two images' predictions
        first = {}
        for row, image_id in enumerate(dataset["image_id"]):
            if first.setdefault(image_id, row) != row:
                raise ValueError(f"{source}, {split} split: id {image_id!r} (--id_column {id_column}) names rows "
                                 f"{first[image_id]} and {row}, two images; name a column of unique ids, or give "
                                 "one row per image holding all its captions.")
    for row, value in enumerate(dataset["captions"]):
        caption_list(value, f"{source}, {split} split, row {row}")
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{i:06d}" for i in range(len(dataset))])
    if dataset.features["image_id"].dtype != "string":
        dataset = dataset.cast_column("image_id", datasets.Value("string"))

    if isinstance(dataset.features["captions"], datasets.Value):  # one caption per image: make it a list
        as_lists = datasets.Features({**dataset.features, "captions": datasets.List(datasets.Value("string"))})
        dataset = dataset.map(lambda caption: {"captions": [] if caption is None else [caption]},
                              input_columns="captions", desc="captions as lists", features=as_lists)
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def caption_list(value, where: str) -> list[str]:
    """A row's captions as a list of strings. A string or a list of strings is what captions are; a missing value
    (null) is no caption, dropped later like a blank one. Anything else is refused, naming the row: a dict would
    train on its keys, a list of lists on Python reprs, and a null inside a list means a broken export."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: the captions are {_kind(value)}; give a string or a list of strings.")
    for index, caption in enumerate(value):
        if not isinstance(caption, str):
            raise ValueError(f"{where}: caption {index} is {_kind(caption)}; give a string or a list of strings.")
    return value


def _kind(value) -> str:
    """What a JSON value is, for messages: "a dict ({'en': 'a dog'})"."""
    if value is None:
        return "None"
    kind = {bool: "a bool", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a dict"}
    shown = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} ({shown if len(shown) <= 60 else shown[:57] + '...'})"


def read_annotation_file(path: str, image_column: str, caption_column: str, id_column: str | None) -> Dataset:
    """JSONL or CSV rows → one row per image with all its captions. Image paths are relative to the file's
    folder and must stay inside it (`resolve_inside`: `..`, absolute paths or symlinks leading out are refused);
    rows must be JSON objects and captions strings (`caption_list`), or the error names the row."""
    path = Path(path)
    root = path.parent.resolve()
    rows = list(_read_rows(path))
    if not rows:
        raise ValueError(f"{path} has no rows.")
    check_columns(list(rows[0][1]), [image_column, caption_column] + ([id_column] if id_column else []), path)
    grouped: dict[str, dict] = {}
    first_row: dict[str, tuple[int, str]] = {}  # image id -> (the row that gave it, its image)
    for line, row in rows:
        image = resolve_inside(root, row.get(image_column), f"{path}, row {line}")
        captions = caption_list(row.get(caption_column), f"{path}, row {line}")
        # the path inside the file's folder: a bare base name would give beach/photo.jpg and park/photo.jpg one id
        relative = Path(image).relative_to(root).as_posix()
        image_id = _row_id(row, id_column, f"{path}, row {line}") if id_column else relative
        other_line, other = first_row.setdefault(image_id, (line, relative))
        if other != relative:
            raise ValueError(f"{path}, row {line}: id {image_id!r} (--id_column {id_column}) is already the id of "
                             f"another image (row {other_line}, {other}); give each image its own id.")
        entry = grouped.setdefault(image, {"image_id": image_id, "image": image, "captions": []})
        if entry["image_id"] != image_id:
            raise ValueError(f"{path}, row {line}: image {relative} has the id {image_id!r} here and "
                             f"{entry['image_id']!r} above (--id_column {id_column}); give an image one id.")
        entry["captions"].extend(captions)
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string"))})
    return Dataset.from_list(list(grouped.values()), features=features)


def _row_id(row: dict, id_column: str, where: str) -> str:
    """The row's image id from `id_column`, refused when the row lacks one: a missing or null id would become
    "None", and several images would share it."""
    value = row.get(id_column)
    if value is None or not str(value).strip():
        what = "no value" if value is None else "an empty value"
        raise ValueError(f"{where}: {what} in the id column {id_column!r} (--id_column); give every row an id, or "
                         "leave --id_column out to use the image paths.")
    return str(value)


def _read_rows(path: Path):
    """(line number, row) pairs; a decoding or syntax error names the row instead of a byte offset."""
    data = path.read_bytes()
    if path.suffix.lower() == ".csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line}: not valid UTF-8 ({error.reason}). "
                             "Re-save the file as UTF-8.") from None
        for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield number, row
        return
    one_per_line = "annotation files hold one JSON object per line (JSONL)"
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, row {number}: not valid UTF-8 ({error.reason}). "
                             "Re-save the file as UTF-8.") from None
        except json.JSONDecodeError as error:
            if raw.strip().startswith(b"["):  # a pretty-printed JSON array: its first line is "["
                raise ValueError(
                    f"{path}, row {number}: the file is a JSON array, not JSONL; {one_per_line}.") from None
            raise ValueError(f"{path}, row {number}: not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            kind = "a JSON array" if isinstance(row, list) else _kind(row).split(" (")[0]
            raise ValueError(f"{path}, row {number}: {kind}, not an object; {one_per_line}.")
        yield number, row


def resolve_inside(root: Path, value, where: str) -> str:
    """The one resolver for image references (annotation files, imagefolder rows, parquet and Hub rows): `value`,
    relative to `root` or absolute, with symlinks resolved, refused unless the file it names lies inside `root`
    (itself resolved). URLs are refused: datasets would fetch them when the row is decoded."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: the image path is empty.")
    if not isinstance(value, str):
        raise ValueError(f"{where}: the image path is {_kind(value)}, not a string.")
    if "://" in value:
        raise ValueError(f"{where}: image path {value!r} is a URL; refused, only files inside {root} are read.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\udce9" (a Latin-1 name as Python spells it) or a lone surrogate
        raise ValueError(f"{where}: image path {value!r} is not valid UTF-8, which data sets store names in. Rename "
                         "the file to a UTF-8 name and list it under that name.") from None
    resolved = (root / value).resolve()  # an absolute value replaces root; symlinks followed, so a link out is caught
    if not resolved.is_relative_to(root):
        raise ValueError(f"{where}: image path {value!r} leads outside {root}; refused.")
    try:  # a directory, FIFO or device, or a name too long to exist: refused here, nothing opened
        regular_file_size(resolved, f"{where}: image path {value!r}")
    except OSError:
        pass  # missing, forbidden, a file as a folder: dropped and named later with the other unreadable images
    return str(resolved)


def check_image_references(dataset: Dataset, root: Path | None, source: str, split: str) -> Dataset:
    """Every row's image through `resolve_inside`. An entry with bytes is the data set's own content and passes as
    is (its path is only a name, never read). An entry with only a path must lie inside `root`: the annotation
    file's or imagefolder's folder, a local data set's folder, a Hub data set's downloaded files; with no root
    (the embedded data set) it is refused. Refusal raises before training, naming source, split, row and path.
    Paths are rewritten to the resolved file, so what is read later is what was checked."""
    root = root.resolve() if root is not None else None
    repointed = {}
    for row, (data, path) in enumerate(_image_entries(dataset)):
        if data is not None or path is None:
            continue
        where = f"{source}, {split} split, row {row}"
        if root is None:
            raise ValueError(f"{where}: image {path!r} is a path, not bytes; {source} has no folder to read it "
                             "from. Refused.")
        resolved = resolve_inside(root, path, where)
        if resolved != path:
            repointed[row] = resolved
    if not repointed:
        return dataset

    def repoint(entry, row):
        return {"image": {"bytes": entry["bytes"], "path": repointed.get(row, entry["path"])}}

    plain = dataset.with_format(None).cast_column("image", datasets.Image(decode=False))
    return (plain.map(repoint, input_columns="image", with_indices=True, desc=f"resolving {split} image paths")
            .cast_column("image", datasets.Image()))


def _image_entries(dataset: Dataset):
    """(bytes as a zero-copy buffer or None, path or None) for each row's image, in the dataset's order, read from
    the Arrow table: nothing is decoded or copied, so this is cheap even for Flickr30K's 4 GB of JPEGs."""
    column = dataset.data.column("image")  # struct<bytes: binary, path: string>, datasets' Image() storage
    starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    rows = range(len(column)) if dataset._indices is None else dataset._indices.column(0).to_pylist()
    for row in rows:  # `_indices`: what select/filter/shuffle left, in their order
        chunk = int(np.searchsorted(starts, row, side="right")) - 1
        entry = column.chunks[chunk][row - starts[chunk]]
        if not entry.is_valid:
            yield None, None
            continue
        data, path = entry["bytes"], entry["path"]
        yield (data.as_buffer() if data.is_valid else None), (path.as_py() if path.is_valid else None)


# ---- reading images ------------------------------------------------------------------------------------------
def read_image(entry):
    """A dataset image entry (bytes/path dict, path or PIL image) as an RGB image, through `load_image`; None for one
    that can no longer be read. Rows are read after the up-front check: a file deleted or replaced since is named in
    one warning, and the collator leaves its row out (CaptionTrainer counts it and stops the run past its stated
    share). An image `load_image` has already returned passes through unchanged (it is RGB: nothing to convert
    again); one decoded by `datasets` itself gets the same checks and conversion as a file."""
    if entry is None:  # lost when the row was read (warned then)
        return None
    try:
        return load_image(entry, name=entry.get("path") if isinstance(entry, dict) else None)
    except ImageLoadError as error:
        logger.warning("%s Leaving it out of this batch.", error)
        return None


def _decode_images(batch: dict) -> dict:
    batch["image"] = [read_image(entry) for entry in batch["image"]]
    return batch


def with_checked_images(dataset: Dataset) -> Dataset:
    """The dataset with its images decoded by `load_image` whenever rows are read (the collator, the sample grid,
    anything), instead of by datasets' plain `PIL.Image.open`: the same checks as the up-front pass (format
    allow-list, pixel and decode budgets), and a clear error for a file that changed or disappeared since.
    To read another column without decoding, go through the plain table: `dataset.with_format(None)["captions"]`.
    Iterating `dataset["captions"]` decodes every image (datasets >= 4 returns a lazy column that formats rows)."""
    plain = dataset.with_format(None).cast_column("image", datasets.Image(decode=False))
    return plain.with_transform(_decode_images, columns=["image"], output_all_columns=True)


def _checked_like(result: Dataset, source: Dataset) -> Dataset:
    """`result` (a map of `source` over its stored values) with `source`'s image decoding put back. Maps run on
    `source.with_format(None)`: through the transform they would decode every image for nothing."""
    checked = source.format["format_kwargs"].get("transform") is _decode_images
    return with_checked_images(result) if checked and "image" in result.column_names else result


# ---- cleaning ------------------------------------------------------------------------------------------
def require_images(dataset: Dataset, split: str, why: str) -> Dataset:
    """A split that cleaning left empty stops the run here, before training, not after it in an evaluation."""
    if len(dataset) == 0:
        raise ValueError(f"The {split} split has no image left: {why}. Fix its data (the log above names what was "
                         "dropped), or leave out the --do_* flag that needs it.")
    return dataset


def load_or_reason(entry, image_id: str):
    """(image, "") or (None, why `load_image` refused it), for the up-front checks; named by its path, else by its
    row's id (a null entry has neither path nor bytes)."""
    try:
        return load_image(entry, name=(entry or {}).get("path") or image_id), ""
    except ImageLoadError as error:
        return None, str(error)


def drop_unreadable_images(dataset: Dataset, split: str, num_proc: int | None = None) -> Dataset:
    """Decode every image once before training; drop and log the ones that fail, so that a corrupt file is
    a line in the log instead of a crash mid-epoch. The result is cached by datasets like any map. A split with
    no readable image left is an error (`require_images`)."""

    def reasons(batch):
        return {"unreadable": [load_or_reason(entry, image_id)[1]
                               for entry, image_id in zip(batch["image"], batch["image_id"])]}

    raw = dataset.with_format(None).cast_column("image", datasets.Image(decode=False))
    checked = raw.map(reasons, batched=True, batch_size=64, num_proc=num_proc, desc=f"checking {split} images")
    return skip_unreadable(dataset, checked["unreadable"], split)  # select keeps `with_checked_images`' format


def skip_unreadable(dataset: Dataset, reasons: list[str], split: str) -> Dataset:
    """`dataset` without the rows whose reason (why `load_image` refused the image) is set, each logged; a split
    with nothing left is an error (`require_images`)."""
    bad = [(i, reason) for i, reason in enumerate(reasons) if reason]
    if bad:
        logger.warning("%s: skipping %d unreadable image(s) of %d:\n%s", split, len(bad), len(dataset),
                       "\n".join(f"  {reason}" for _, reason in bad))
        dataset = dataset.select(sorted(set(range(len(dataset))) - {i for i, _ in bad}))
    return require_images(dataset, split, f"all {len(bad)} are unreadable" if bad else "it is empty")


def remove_empty_captions(dataset: Dataset, split: str) -> Dataset:
    """Blank captions teach nothing (and would be an EOS-only target); images left with none are dropped. A split
    with no captioned image left is an error (`require_images`)."""
    def clean(batch):  # NUL bytes and surrounding whitespace are never part of a caption
        return {"captions": [[c.replace("\x00", "").strip() for c in caps or [] if c and c.replace("\x00", "").strip()]
                             for caps in batch["captions"]]}

    cleaned = dataset.with_format(None).map(clean, batched=True, desc=f"cleaning {split} captions")
    empty = sum(1 for caps in cleaned["captions"] if not caps)
    if empty:
        logger.warning("%s: dropping %d image(s) without a non-empty caption.", split, empty)
        cleaned = cleaned.filter(lambda caps: len(caps) > 0, input_columns="captions")
    require_images(cleaned, split, f"all {empty} had only empty captions" if empty else "it is empty")
    return _checked_like(cleaned, dataset)


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

    return _checked_like(dataset.with_format(None).map(expand, batched=True, desc="one row per caption"), dataset)


def add_caption_lengths(dataset: Dataset, tokenizer) -> Dataset:
    """A `length` column for Trainer's `--train_sampling_strategy group_by_length`: batches of similar caption
    lengths pad less. Per pair its caption's tokens; per image (random-caption mode) the mean of its captions."""
    def lengths(batch):
        texts = batch["caption"] if "caption" in batch else [c for row in batch["captions"] for c in row]
        texts = [str(text) for text in texts]
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if "caption" in batch:
            return {"length": counts}
        out, start = [], 0
        for row in batch["captions"]:
            out.append(round(sum(counts[start:start + len(row)]) / len(row)))
            start += len(row)
        return {"length": out}

    return _checked_like(dataset.with_format(None).map(lengths, batched=True, desc="caption lengths"), dataset)


# ---- CLIP feature cache --------------------------------------------------------------------------------
def vision_cache_key(model, processor) -> str:
    """Changes whenever the cached features would: the vision weights, which features are taken, and the
    image preprocessing. Hashing CLIP-B/32's 88 M weights takes about a second."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    config = model.config
    digest.update(f"{config.vision_feature_type}:{config.vision_feature_layer}".encode())
    digest.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def image_content_key(dataset: Dataset) -> str:
    """A digest of the images themselves, row by row, so that a photo replaced under the same name gets new
    features: the SHA-256 of the bytes where a row carries them (parquet, Hub, embedded data); for a row that holds
    only a path (annotation files, imagefolders), the resolved file's path, size, modification time and inode change
    time, not its content, which would cost a read of every file. A replacement changes at least the change time,
    which, unlike the modification time, no copy tool (`cp -p`, `rsync -t`) can set back."""
    digest = hashlib.sha256()
    for data, path in _image_entries(dataset):
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


# Bumped when the cache file's layout or meaning changes, so that an old file is never read as a new one. /2: before
# it, a BatchNorm tower loaded with --model_name_or_path encoded in training mode (batch statistics).
_CACHE_LAYOUT = "features+unreadable/2"


def add_vision_features(dataset: Dataset, model, processor, cache_dir: str | Path, batch_size: int = 64, *,
                        split: str = "train", num_workers: int | None = None, drop_unreadable: bool = True,
                        rank: int = 0, world_size: int = 1, local_rank: int = 0, barrier=None) -> Dataset:
    """Replace the `image` column by the frozen CLIP output (`vision_embeds`), computed once per image and
    stored in an Arrow file keyed by the vision weights, the preprocessing, the rows (datasets' fingerprint: ids,
    captions, paths) and the images' content (`image_content_key`). Training from it never decodes an image again,
    and each image is encoded once however many captions or epochs it has. A cache file is used only if it matches
    the manifest written beside it (size and SHA-256, so a truncated or damaged file is caught and rebuilt; checking
    reads the file once, about a second per GB).

    Decode once: each image is decoded exactly once, by `load_image`, in the same pass that encodes it, which is
    also the unreadable-image check: an image `load_image` refuses is dropped and logged by name, as
    `drop_unreadable_images` does (`drop_unreadable=False`: the first one stops the run instead), and a split left
    empty is an error (`require_images`). The reasons are stored in the cache, so a rerun logs the same lines
    without decoding anything.

    Parallel: `num_workers` processes (a torch DataLoader) decode and preprocess batches of `batch_size` images
    with `images.pixel_values` (the processor's recipe), while the main process runs the vision tower on them, batch by
    batch in row order. The batches are the same whatever the number of workers, so the features are bit-identical,
    and the cache key does not depend on it.

    Distributed (`world_size` > 1, `barrier` a callable that waits for every rank): rank r encodes its contiguous
    shard of the rows (whole batches, `_shard_bounds`) into its own file (`...-shard-r-of-n.arrow`, with its
    manifest), all ranks wait, then every rank reads all shard files in order: the full cache. Where `cache_dir` is
    not shared between machines, the first process of each machine (`local_rank` 0) then encodes the shards its
    disk lacks. Any complete set of valid files for the key (one file, or all shards of an earlier run with another
    number of processes) is reused as it is."""
    key = (f"{vision_cache_key(model, processor)}:{dataset._fingerprint}:{image_content_key(dataset)}:"
           f"{_CACHE_LAYOUT}")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    whole = cache_dir / f"vision-features-{fingerprint}.arrow"
    files = _complete_cache(cache_dir, fingerprint)
    if files is None:  # build this process's part (all rows in one process)
        if world_size > 1:
            target = _shard_file(cache_dir, fingerprint, rank, world_size)
            start, stop = _shard_bounds(len(dataset), rank, world_size, batch_size)
        else:
            target, start, stop = whole, 0, len(dataset)
        discard_damaged_cache(target)
        if not target.exists():
            if world_size > 1:
                logger.info("%s: rank %d of %d encodes rows %d to %d (%d images) into %s", split, rank, world_size,
                            start, stop - 1, stop - start, target.name)
            _encode_to_file(dataset, range(start, stop), model, processor, target, batch_size, num_workers, split)
            if world_size == 1:
                files = [target]  # just written and recorded in its manifest: no need to read it again
    if world_size > 1 and barrier is not None:
        barrier()  # every rank, whether it built or reused: the number of barriers never depends on the files
        files = files or _complete_cache(cache_dir, fingerprint, world_size)
        # Another node's shards are missing where the folder is not shared between machines: each node's first
        # process encodes them on its own disk, one writer per file, while the node's other processes wait.
        if files is None and local_rank == 0:
            for other in range(world_size):
                shard = _shard_file(cache_dir, fingerprint, other, world_size)
                if not _is_valid(shard):
                    logger.info("%s: %s is not in %s (a folder not shared with the other machines); encoding it "
                                "here too", split, shard.name, cache_dir)
                    discard_damaged_cache(shard)
                    _encode_to_file(dataset, range(*_shard_bounds(len(dataset), other, world_size, batch_size)),
                                    model, processor, shard, batch_size, num_workers, split)
        barrier()
    if files is None:
        files = _complete_cache(cache_dir, fingerprint, world_size)
        if files is None:
            raise RuntimeError(f"The feature cache for {split} in {cache_dir} is incomplete or damaged after every "
                               f"process wrote its part (key {fingerprint}). Give every process of a machine the "
                               "same --feature_cache_dir.")
    parts = [Dataset.from_file(str(file)) for file in files]
    # a shard may be empty
    features = datasets.concatenate_datasets([part for part in parts if len(part)] or parts[:1])
    if len(features) != len(dataset):
        raise RuntimeError(f"The feature cache {files[0]} has {len(features)} rows for {len(dataset)} images.")
    if world_size > 1:
        logger.info("%s: rank %d of %d reads the feature cache: %d images from %d file(s)", split, rank, world_size,
                    len(features), len(files))

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
    """Rows [start, stop) of `rank`'s contiguous shard: the batches of `batch_size` rows shared out as
    `Dataset.shard(world_size, rank, contiguous=True)` shares rows. Whole batches, so that every image is encoded
    in the same batch whatever the number of processes: the vision tower's output can differ in the last bits with
    the batch it is computed in, and the merged cache is then bit-identical to a one-process one."""
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
    counts = {int(path.name.rsplit("-of-", 1)[1].split(".")[0])
              for path in cache_dir.glob(f"vision-features-{fingerprint}-shard-*-of-*.arrow")}
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
        expected = json.loads(_manifest(cache_file).read_text())
    except (OSError, ValueError):
        return "it has no readable manifest, so its content cannot be checked"
    try:
        size = cache_file.stat().st_size
        if size != expected.get("size"):
            return f"{size:,} bytes instead of {expected.get('size'):,}"
        if sha256_of(cache_file) != expected.get("sha256"):
            return "its SHA-256 differs from the one recorded when it was written"
    except OSError as error:  # gone or unreadable since the manifest was read
        return f"it cannot be read ({error})"
    return None


# Images one worker decodes and preprocesses at a time: small enough to share a batch of the vision tower among
# the workers, large enough that the hand-over costs nothing (a chunk of 16 is 9.6 MB of pixel values).
DECODE_CHUNK = 16


class _DecodedChunks(torch.utils.data.Dataset):
    """Chunk i of the rows: (batch it belongs to, last chunk of it?, pixel values of its readable images or None,
    reasons per row, "" if readable). The rows are cut into batches of `batch_size` for the vision tower, each
    batch into chunks of at most `DECODE_CHUNK` for the workers. Each image is decoded once, by `load_image`, and
    preprocessed as `images.pixel_values` does it (the processor's CLIP recipe, each image on its own): the same
    code whether it runs here or in a DataLoader worker, and the same as training without the cache. With CLIP's
    recipe the pixel values come as 8-bit crops, which `ClipPixels.normalise` finishes where the vision tower runs:
    a quarter of the bytes to hand over from the workers (and to copy to a GPU)."""

    def __init__(self, raw: Dataset, processor, rows: range, batch_size: int, chunk: int | None = None):
        self.raw, self.processor = raw, processor
        self.fast = ClipPixels.for_processor(processor)  # None: not CLIP's recipe, the processor's own call instead
        chunk = chunk or DECODE_CHUNK
        self.chunks = []
        for batch, start in enumerate(range(rows.start, rows.stop, batch_size)):
            stop = min(start + batch_size, rows.stop)
            self.chunks += [(batch, range(first, min(first + chunk, stop)), first + chunk >= stop)
                            for first in range(start, stop, chunk)]
        self.batches = -(-len(rows) // batch_size)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        batch, rows, last = self.chunks[index]
        block = self.raw[rows.start:rows.stop]
        loaded = [load_or_reason(entry, image_id) for entry, image_id in zip(block["image"], block["image_id"])]
        images = [image for image, _ in loaded if image is not None]
        reasons = [reason for _, reason in loaded]
        if not images:
            return batch, last, None, reasons
        return batch, last, self.fast.crops(images) if self.fast else pixel_values(images, self.processor), reasons


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
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_as_is, worker_init_fn=_one_thread if workers else None,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    return chunks, loader


@torch.no_grad()
def _encode_to_file(dataset: Dataset, rows: range, model, processor, cache_file: Path, batch_size: int,
                    num_workers: int | None, split: str = "train") -> None:
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
    try:
        empty = datasets.Features({"vision_embeds": datasets.List(datasets.Value("float32")),
                                   "unreadable": datasets.Value("string")})
        with ArrowWriter(path=str(temporary), features=None if len(rows) else empty) as writer:
            # a bar updated by hand: tqdm wrapped around a DataLoader with workers starts it twice (every image decoded
            # twice, torch 2.13 / tqdm 4)
            workers = loader.num_workers or "no"
            progress = datasets.utils.tqdm(total=batches.batches, unit="batch",
                                           desc=f"image features, {split} ({workers} decoding worker(s))")
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
                    embeds = model.get_vision_embeds(pixels).float().cpu().numpy()
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
        tower.train(was_training)
        temporary.unlink(missing_ok=True)
    _write_manifest(cache_file)


def _manifest(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".manifest.json")


def _write_manifest(cache_file: Path) -> None:
    manifest = {"size": cache_file.stat().st_size, "sha256": sha256_of(cache_file)}
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


# ---- batching --------------------------------------------------------------------------------------------
class CaptionCollator:
    """Rows → model inputs. A row with `caption` (expanded mode) uses it; otherwise one of its `captions` is
    drawn at random each time the row is seen: a fresh caption per image per epoch. The draw depends only on
    (seed, epoch, image id) — not on a global RNG, which data-loader prefetching advances ahead of the step a
    checkpoint records — so a resumed run draws exactly what an uninterrupted one would. `CaptionEpochCallback`
    keeps `epoch` current. Without captions (`for_generation`) it builds left-padded prompts for `generate()`. The
    text around the image is the processor's `prompt`, the one saved with it.
    Images come through `read_image`: a row whose image can no longer be read (deleted or replaced since the
    up-front check) is left out, its id in the batch's `lost_images` for CaptionTrainer to count; a batch that lost
    every row holds only that. Pixel values come from `images.pixel_values`, as the feature cache's do: one image
    path whether training reads features or pixels."""

    def __init__(self, processor, max_caption_length: int | None = None, for_generation: bool = False,
                 seed: int = 0):
        self.processor = processor
        self.max_caption_length = max_caption_length
        self.for_generation = for_generation
        self.seed = seed
        self.epoch = 0

    def pick_caption(self, row: dict) -> str:
        if "caption" in row:
            return row["caption"]
        return random.Random(f"{self.seed}:{self.epoch}:{row['image_id']}").choice(row["captions"])

    def __call__(self, rows: list[dict]) -> dict:
        lost = []
        if "vision_embeds" not in rows[0]:  # decoded by `with_checked_images` already, or an undecoded entry
            rows = [dict(row, image=read_image(row["image"])) for row in rows]
            lost = [row["image_id"] for row in rows if row["image"] is None]
            rows = [row for row in rows if row["image"] is not None]
        if not rows:
            return {"lost_images": lost}
        captions = None if self.for_generation else [self.pick_caption(row) for row in rows]
        # "" per row: the processor's prompt (and the batch size when there are no captions to count)
        batch = self.processor(text=[""] * len(rows), suffix=captions, max_caption_length=self.max_caption_length)
        if lost:
            batch["lost_images"] = lost
        if "vision_embeds" in rows[0]:
            batch["vision_embeds"] = torch.as_tensor(np.stack([row["vision_embeds"] for row in rows]))
        else:
            batch["pixel_values"] = pixel_values([row["image"] for row in rows], self.processor)
        if self.for_generation:
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows])
        return batch


class CaptionEpochCallback(TrainerCallback):
    """Tells the collator which epoch it is batching, for its per-epoch caption draw."""

    def __init__(self, collator: CaptionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
