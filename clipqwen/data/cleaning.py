"""Path safety, image reading and the cleaning every split goes through."""

from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset
from transformers.utils import logging

from ..images import ImageLoadError, load_image, regular_file_size


logger = logging.get_logger(__name__)


def kind_of(value) -> str:
    """What a JSON value is, for messages: "a dict ({'en': 'a dog'})"."""
    if value is None:
        return "None"
    kind = {bool: "a bool", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a dict"}
    shown = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} ({shown if len(shown) <= 60 else shown[:57] + '...'})"


def resolve_inside(root: Path, value, where: str) -> str:
    """The one resolver for image references (annotation files, imagefolder rows, parquet and Hub rows): `value`,
    relative to `root` or absolute, with symlinks resolved, refused unless the file it names lies inside `root`
    (itself resolved). URLs are refused: datasets would fetch them when the row is decoded."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: the image path is empty.")
    if not isinstance(value, str):
        raise ValueError(f"{where}: the image path is {kind_of(value)}, not a string.")
    if "://" in value:
        raise ValueError(f"{where}: image path {value!r} is a URL; refused, only files inside {root} are read.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\udce9" (a Latin-1 name as Python spells it) or a lone surrogate
        raise ValueError(
            f"{where}: image path {value!r} is not valid UTF-8, which data sets store names in. Rename "
            "the file to a UTF-8 name and list it under that name."
        ) from None
    resolved = (root / value).resolve()  # an absolute value replaces root; symlinks followed, so a link out is caught
    if not resolved.is_relative_to(root):
        raise ValueError(f"{where}: image path {value!r} leads outside {root}; refused.")
    try:  # a directory, FIFO or device, or a name too long to exist: refused here, nothing opened
        regular_file_size(resolved, f"{where}: image path {value!r}")
    except OSError:
        pass  # missing, forbidden, a file as a folder: dropped and named later with the other unreadable images
    return str(resolved)


def check_image_references(dataset: Dataset, root: Path | None, source: str, split: str) -> Dataset:
    """Every path-only image entry through `resolve_inside`, rewritten to the resolved file so that
    what is read later is what was checked (with no `root` a path is refused); bytes entries pass.
    Refusal raises before training, naming source, split, row and path."""
    root = root.resolve() if root is not None else None
    repointed = {}
    for row, (data, path) in enumerate(image_entries(dataset)):
        if data is not None or path is None:
            continue
        where = f"{source}, {split} split, row {row}"
        if root is None:
            raise ValueError(
                f"{where}: image {path!r} is a path, not bytes; {source} has no folder to read it from. Refused."
            )
        resolved = resolve_inside(root, path, where)
        if resolved != path:
            repointed[row] = resolved
    if not repointed:
        return dataset

    def repoint(entry, row):
        return {"image": {"bytes": entry["bytes"], "path": repointed.get(row, entry["path"])}}

    plain = dataset.with_format(None).cast_column("image", datasets.Image(decode=False))
    return plain.map(
        repoint, input_columns="image", with_indices=True, desc=f"resolving {split} image paths"
    ).cast_column("image", datasets.Image())


def image_entries(dataset: Dataset):
    """(bytes as a zero-copy buffer or None, path or None) for each row's image, in the dataset's
    order, from the Arrow table: nothing is decoded or copied, so it is cheap even for Flickr30K."""
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
    """A dataset image entry (bytes/path dict, path or PIL image) as RGB through `load_image`, or
    None with a warning for a file lost since the up-front check (the collator leaves its row out
    and CaptionTrainer counts it). An image `load_image` already returned passes unchanged."""
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
    """The dataset with its images decoded by `load_image` whenever rows are read, not by datasets'
    plain `PIL.Image.open`. Read other columns from the plain table: `dataset["captions"]` decodes
    every image, `dataset.with_format(None)["captions"]` none."""
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
        raise ValueError(
            f"The {split} split has no image left: {why}. Fix its data (the log above names what was "
            "dropped), or leave out the --do_* flag that needs it."
        )
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
        return {
            "unreadable": [
                load_or_reason(entry, image_id)[1] for entry, image_id in zip(batch["image"], batch["image_id"])
            ]
        }

    raw = dataset.with_format(None).cast_column("image", datasets.Image(decode=False))
    checked = raw.map(reasons, batched=True, batch_size=64, num_proc=num_proc, desc=f"checking {split} images")
    return skip_unreadable(dataset, checked["unreadable"], split)  # select keeps `with_checked_images`' format


def skip_unreadable(dataset: Dataset, reasons: list[str], split: str) -> Dataset:
    """`dataset` without the rows whose reason (why `load_image` refused the image) is set, each logged; a split
    with nothing left is an error (`require_images`)."""
    bad = [(i, reason) for i, reason in enumerate(reasons) if reason]
    if bad:
        logger.warning(
            "%s: skipping %d unreadable image(s) of %d:\n%s",
            split,
            len(bad),
            len(dataset),
            "\n".join(f"  {reason}" for _, reason in bad),
        )
        dataset = dataset.select(sorted(set(range(len(dataset))) - {i for i, _ in bad}))
    return require_images(dataset, split, f"all {len(bad)} are unreadable" if bad else "it is empty")


def remove_empty_captions(dataset: Dataset, split: str) -> Dataset:
    """Blank captions teach nothing (and would be an EOS-only target); images left with none are dropped. A split
    with no captioned image left is an error (`require_images`)."""

    def clean(batch):  # NUL bytes and surrounding whitespace are never part of a caption
        return {
            "captions": [
                [c.replace("\x00", "").strip() for c in caps or [] if c and c.replace("\x00", "").strip()]
                for caps in batch["captions"]
            ]
        }

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
            out.append(round(sum(counts[start : start + len(row)]) / len(row)))
            start += len(row)
        return {"length": out}

    return _checked_like(dataset.with_format(None).map(lengths, batched=True, desc="caption lengths"), dataset)
