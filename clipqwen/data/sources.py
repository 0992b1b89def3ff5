"""Every source of captioned images, loaded into one layout (see the package docstring)."""

import csv
import glob
import io
import json
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from transformers.utils import logging

from .. import hub
from .cleaning import check_image_references, kind_of, resolve_inside, with_checked_images


logger = logging.get_logger(__name__)


# Karpathy's split of Flickr30K (images per split), as nlphuji/flickr30k's `split` column holds it.
KARPATHY_FLICKR30K = {"train": 29000, "validation": 1014, "test": 1000}
# nlphuji/flickr30k's parquet schema (refs/convert/parquet): five captions and their sentence ids per photo
FLICKR30K_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
)
SPLIT_ALIASES = {
    "train": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
}


def load_caption_data(args, cache_dir: str | None = None) -> DatasetDict:
    """The data named by `DataTrainingArguments` in the common layout, each split through the same
    guards: image paths inside the source's root, string captions, decoding by `load_image`."""
    loaded = {}  # split -> (dataset, source named in messages, root its image paths must stay inside, or None)
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    dirs = {"train": args.train_dir, "validation": args.validation_dir, "test": args.test_dir}
    if args.dataset_name == "embedded":
        from .embedded import load_embedded_dataset

        loaded = {split: (dataset, "embedded", None) for split, dataset in load_embedded_dataset().items()}
    elif any(files.values()):
        loaded = {
            split: (
                read_annotation_file(path, args.image_column, args.caption_column, args.id_column),
                path,
                Path(path).parent,
            )
            for split, path in files.items()
            if path
        }
    elif any(dirs.values()):
        loaded = {
            split: (
                standardise(
                    load_image_folder(path, args.caption_column, cache_dir),
                    args.image_column,
                    args.caption_column,
                    args.id_column,
                    source=path,
                    split=split,
                ),
                path,
                Path(path),
            )
            for split, path in dirs.items()
            if path
        }
    else:
        raw = load_hub_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.dataset_revision,
            cache_dir,
            one_split=bool(args.split_column),
        )
        if args.split_column:
            raw = split_by_column(raw, args.split_column, args.dataset_name)
            if args.dataset_name == "nlphuji/flickr30k":
                check_split_sizes(raw, KARPATHY_FLICKR30K, f"{args.dataset_name}@{args.dataset_revision}")
        root = dataset_root(args.dataset_name)
        loaded = {
            split: (
                standardise(
                    ds, args.image_column, args.caption_column, args.id_column, source=args.dataset_name, split=split
                ),
                args.dataset_name,
                root,
            )
            for split, ds in raw.items()
        }
    return DatasetDict(
        {
            split: with_checked_images(check_image_references(dataset, root, source, split))
            for split, (dataset, source, root) in loaded.items()
        }
    )


def dataset_root(name: str) -> Path:
    """Where a `--dataset_name` data set's files live: the folder itself, or a Hub one's repository
    folder in the huggingface_hub cache (imagefolder-style repositories' rows are paths into it)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset")


def load_image_folder(folder: str, caption_column: str, cache_dir: str | None = None) -> Dataset:
    """Every image of `folder` (described by its metadata.jsonl) as one split, whatever the files
    are called: `data_dir` would infer splits from names (`validation_00001.png`, `test_*.jpg`), so
    the files go in as one split's `data_files` and the flag that named the folder decides."""
    check_metadata_captions(Path(folder), caption_column)
    files = {"train": glob.escape(str(folder)) + "/**"}  # glob.escape: a folder named like a pattern ("[1]") is a name
    return datasets.load_dataset("imagefolder", data_files=files, split="train", cache_dir=cache_dir)


def check_metadata_captions(folder: Path, caption_column: str) -> None:
    """Check the captions of an imagefolder's metadata.jsonl files row by row before datasets reads
    them: its JSON reader would fail on mixed types with an Arrow error naming no file."""
    for path in sorted(folder.rglob("metadata.jsonl")):
        for line, row in _read_rows(path):
            key = caption_column if caption_column in row or caption_column != "captions" else "text"  # as standardise
            caption_list(row.get(key), f"{path}, row {line}")


def load_hub_dataset(name, config_name, revision, cache_dir, one_split: bool = False):
    """A Hub data set, or a local folder of data files. With `one_split` (split from a column) a
    local folder's parquet files are read as one split: datasets would infer splits from file names
    and lose every file whose name names none (`0000.parquet` beside `test-0000.parquet`)."""
    local = one_split and Path(name).is_dir()
    parquet = sorted(str(path) for path in Path(name).glob("**/*.parquet")) if local else []
    try:
        if parquet:
            return datasets.load_dataset("parquet", data_files={"train": parquet}, cache_dir=cache_dir)
        return datasets.load_dataset(name, config_name, revision=revision, cache_dir=cache_dir)
    except (ConnectionError, OSError, FileNotFoundError) as error:
        if local := hub.local_file_error(error):  # writing datasets' cache failed: not a download problem
            raise SystemExit(
                f"error: could not load the data set {name!r}: {local}. {hub.local_file_hint(local)}"
            ) from error
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
        raise ValueError(
            f"{source}: column {column!r} holds {unknown}; expected split names among {sorted(SPLIT_ALIASES)}."
        )
    labels = everything[column]
    return DatasetDict(
        {
            SPLIT_ALIASES[value]: everything.select(
                [i for i, label in enumerate(labels) if label == value]
            ).remove_columns(column)
            for value in values
        }
    )


def check_split_sizes(raw: DatasetDict, expected: dict[str, int], source: str) -> None:
    """Warn when a known data set's splits do not have their published sizes: another revision or a re-conversion
    changed the data, and scores are then not comparable with published ones."""
    found = {split: len(dataset) for split, dataset in raw.items()}
    if found != expected:
        logger.warning(
            "%s has splits of %s images, not the Karpathy split's %s: the data differ from the published "
            "split, so scores are not comparable with published ones. Pin --dataset_revision to a commit "
            "whose data you checked.",
            source,
            found,
            expected,
        )


def check_columns(available: list[str], columns, source, flag: str = "--image_column/--caption_column"):
    missing = [column for column in columns if column not in available]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {list(available)}. "
            f"Name the right ones with {flag}."
        )


def standardise(
    dataset: Dataset, image_column: str, caption_column: str, id_column: str | None, source: str, split: str = "train"
) -> Dataset:
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
                raise ValueError(
                    f"{source}, {split} split: id {image_id!r} (--id_column {id_column}) names rows "
                    f"{first[image_id]} and {row}, two images; name a column of unique ids, or give "
                    "one row per image holding all its captions."
                )
    for row, value in enumerate(dataset["captions"]):
        caption_list(value, f"{source}, {split} split, row {row}")
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{i:06d}" for i in range(len(dataset))])
    if dataset.features["image_id"].dtype != "string":
        dataset = dataset.cast_column("image_id", datasets.Value("string"))

    if isinstance(dataset.features["captions"], datasets.Value):  # one caption per image: make it a list
        as_lists = datasets.Features({**dataset.features, "captions": datasets.List(datasets.Value("string"))})
        dataset = dataset.map(
            lambda caption: {"captions": [] if caption is None else [caption]},
            input_columns="captions",
            desc="captions as lists",
            features=as_lists,
        )
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def caption_list(value, where: str) -> list[str]:
    """A row's captions as a list of strings (a null is none, dropped later like a blank one).
    Anything else is refused, naming the row: a dict would train on its keys, a list of lists on
    Python reprs, and a null inside a list means a broken export."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: the captions are {kind_of(value)}; give a string or a list of strings.")
    for index, caption in enumerate(value):
        if not isinstance(caption, str):
            raise ValueError(f"{where}: caption {index} is {kind_of(caption)}; give a string or a list of strings.")
    return value


def read_annotation_file(path: str, image_column: str, caption_column: str, id_column: str | None) -> Dataset:
    """JSONL or CSV rows → one row per image with all its captions. Image paths are relative to the file's
    folder and must stay inside it (`resolve_inside`); rows must be JSON objects and captions
    strings (`caption_list`), or the error names the row."""
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
            raise ValueError(
                f"{path}, row {line}: id {image_id!r} (--id_column {id_column}) is already the id of "
                f"another image (row {other_line}, {other}); give each image its own id."
            )
        entry = grouped.setdefault(image, {"image_id": image_id, "image": image, "captions": []})
        if entry["image_id"] != image_id:
            raise ValueError(
                f"{path}, row {line}: image {relative} has the id {image_id!r} here and "
                f"{entry['image_id']!r} above (--id_column {id_column}); give an image one id."
            )
        entry["captions"].extend(captions)
    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    return Dataset.from_list(list(grouped.values()), features=features)


def _row_id(row: dict, id_column: str, where: str) -> str:
    """The row's image id from `id_column`, refused when the row lacks one: a missing or null id would become
    "None", and several images would share it."""
    value = row.get(id_column)
    if value is None or not str(value).strip():
        what = "no value" if value is None else "an empty value"
        raise ValueError(
            f"{where}: {what} in the id column {id_column!r} (--id_column); give every row an id, or "
            "leave --id_column out to use the image paths."
        )
    return str(value)


def _read_rows(path: Path):
    """(line number, row) pairs; a decoding or syntax error names the row instead of a byte offset."""
    data = path.read_bytes()
    if path.suffix.lower() == ".csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{path}, line {line}: not valid UTF-8 ({error.reason}). Re-save the file as UTF-8."
            ) from None
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
            raise ValueError(
                f"{path}, row {number}: not valid UTF-8 ({error.reason}). Re-save the file as UTF-8."
            ) from None
        except json.JSONDecodeError as error:
            if raw.strip().startswith(b"["):  # a pretty-printed JSON array: its first line is "["
                raise ValueError(
                    f"{path}, row {number}: the file is a JSON array, not JSONL; {one_per_line}."
                ) from None
            raise ValueError(f"{path}, row {number}: not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            kind = "a JSON array" if isinstance(row, list) else kind_of(row).split(" (")[0]
            raise ValueError(f"{path}, row {number}: {kind}, not an object; {one_per_line}.")
        yield number, row
