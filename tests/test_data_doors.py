"""Every way data comes in goes through the same guards (docs/reliability.md): one resolver for image references,
splits from the flag and never from file names, captions that are strings, no split left empty, a feature cache
keyed by content, a decode budget, and an image lost during a run left out, named and counted."""

import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_feature_cache import counting

import run_captioning
from clipqwen import images
from clipqwen.data import sources
from clipqwen.data.cleaning import drop_unreadable_images, remove_empty_captions
from clipqwen.data.collator import CaptionCollator
from clipqwen.data.embedded import load_embedded_dataset
from clipqwen.data.feature_cache import add_vision_features
from clipqwen.data.sources import load_caption_data, read_annotation_file
from clipqwen.images import ImageLoadError, load_image
from clipqwen.training import checkpoints

from conftest import PHOTOS, TINY


FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})


def run(out: Path, *flags):
    args = [*TINY, "--output_dir", str(out), "--feature_cache_dir", str(out.parent / "features"), *flags]
    return run_captioning.main(run_captioning.parse_args(args))


def data_args(**values):
    return run_captioning.DataTrainingArguments(**values)


def photo_rows():
    return [json.loads(line) for line in (PHOTOS / "metadata.jsonl").read_text().splitlines()]


def image_folder(folder: Path, names=None, caption_key="captions") -> list[dict]:
    """The 8 CC-BY photos copied into `folder` (under `names` if given) with a metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = photo_rows()
    with open(folder / "metadata.jsonl", "w") as file:
        for row, name in zip(rows, names or [row["file_name"] for row in rows]):
            shutil.copy(PHOTOS / row["file_name"], folder / name)
            file.write(json.dumps({"file_name": name, caption_key: row["captions"]}) + "\n")
    return rows


def write_parquet(folder: Path, columns: dict, features=FEATURES, split="train") -> Path:
    """A local parquet data set, its image entries written as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict(columns, features=features)
    # a batch size: no size estimate, which reads paths
    dataset.to_parquet(folder / f"{split}.parquet", batch_size=100)
    return folder


def photo_bytes(i=0):
    return sorted(PHOTOS.glob("*.jpg"))[i].read_bytes()


def load_parquet_folder(folder):
    return load_caption_data(data_args(dataset_name=str(folder), dataset_revision=None, split_column=None))


# ---- one resolver for every image reference ----------------------------------------------------------------------
def test_a_parquet_row_with_only_a_path_outside_its_folder_is_refused_before_training(tmp_path):
    secret = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    folder = write_parquet(
        tmp_path / "parquet",
        {"image": [{"bytes": photo_bytes(i), "path": f"{i}.jpg"} for i in range(3)], "caption": [["a photo"]] * 3},
    )
    write_parquet(
        folder,
        {
            "image": [{"bytes": photo_bytes(3), "path": "3.jpg"}, {"bytes": None, "path": str(secret)}],
            "caption": [["a photo"]] * 2,
        },
        split="test",
    )  # would be trained on and drawn in the grid
    refused = rf"{folder}, test split, row 1: image path '{secret}' leads outside {folder}"
    with pytest.raises(ValueError, match=refused):
        run(
            tmp_path / "out",
            "--do_train",
            "--do_predict",
            "--max_steps",
            "1",
            "--dataset_name",
            str(folder),
            "--dataset_revision",
            "None",
            "--split_column",
            "",
            "--caption_column",
            "caption",
        )
    assert not (tmp_path / "out" / "sample_captions.png").exists()


def test_parquet_path_entries_resolve_inside_the_data_set_folder(tmp_path):
    folder = tmp_path / "parquet"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "inside.jpg").write_bytes(photo_bytes(1))
    entries = [
        {"bytes": photo_bytes(0), "path": "/etc/never-read.jpg"},  # shipped bytes: the path is only a name
        {"bytes": None, "path": "images/inside.jpg"},
    ]  # relative to the data set's folder, not to the cwd
    write_parquet(folder, {"image": entries, "caption": [["a"], ["b"]]})
    train = load_parquet_folder(folder)["train"]
    assert [row["image"].size for row in train] == [
        Image.open(PHOTOS / p.name).size for p in sorted(PHOTOS.glob("*.jpg"))[:2]
    ]


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "url"])
def test_parquet_path_entries_leading_out_of_the_folder_are_refused(tmp_path, kind):
    folder, secret = tmp_path / "parquet", tmp_path / "secret.jpg"
    folder.mkdir()
    secret.write_bytes(photo_bytes(0))
    (folder / "link.jpg").symlink_to(secret)
    path = {"dotdot": "../secret.jpg", "symlink": "link.jpg", "url": "https://example.com/secret.jpg"}[kind]
    write_parquet(
        folder,
        {
            "image": [{"bytes": photo_bytes(1), "path": "ok.jpg"}, {"bytes": None, "path": path}],
            "caption": [["a"], ["b"]],
        },
    )
    with pytest.raises(ValueError, match=r"train split, row 1: .*refused"):
        load_parquet_folder(folder)


def test_a_hub_data_set_must_ship_its_images(tmp_path, monkeypatch):
    """A Hub data set's path-only entries may only point at files downloaded from that repository."""
    from huggingface_hub import constants

    shipped = Path(constants.HF_HUB_CACHE) / "datasets--someone--photos" / "snapshots" / "abc" / "train" / "0.jpg"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(photo_bytes(0))
    private = tmp_path / "private.jpg"
    private.write_bytes(photo_bytes(1))

    def hub_rows(*paths):
        columns = {"image": [{"bytes": None, "path": str(p)} for p in paths], "caption": [["a"]] * len(paths)}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=FEATURES)})

    args = data_args(dataset_name="someone/photos", dataset_revision=None, split_column=None)
    monkeypatch.setattr(sources, "load_hub_dataset", lambda *_, **__: hub_rows(shipped))
    assert len(load_caption_data(args)["train"]) == 1
    monkeypatch.setattr(sources, "load_hub_dataset", lambda *_, **__: hub_rows(shipped, private))
    with pytest.raises(ValueError, match=rf"someone/photos, train split, row 1: image path '{private}' leads outside"):
        load_caption_data(args)


def test_a_symlink_out_of_an_imagefolder_is_refused(tmp_path):
    folder, secret = tmp_path / "photos", tmp_path / "secret.jpg"
    image_folder(folder)
    secret.write_bytes(photo_bytes(0))
    (folder / "link.jpg").symlink_to(secret)
    with open(folder / "metadata.jsonl", "a") as file:
        file.write(json.dumps({"file_name": "link.jpg", "captions": ["a secret"]}) + "\n")
    with pytest.raises(ValueError, match=rf"{folder}, train split, row 8: image path '.*link.jpg' leads outside"):
        load_caption_data(data_args(train_dir=str(folder), caption_column="captions"))


def test_an_absolute_annotation_path_inside_its_folder_is_accepted(tmp_path):
    """One rule for every door: where the file is once resolved counts, not how its path is written."""
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": str(tmp_path / "a.jpg"), "caption": "a photo"}) + "\n")
    assert read_annotation_file(str(tmp_path / "train.jsonl"), "image", "caption", None)["captions"] == [["a photo"]]


# ---- splits from the flag, never from file names ------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, names",
    [
        ("train_dir", [f"validation_{i:05d}.jpg" for i in range(8)]),  # datasets finds only a validation split
        ("train_dir", [f"test_{i}.jpg" if i < 3 else f"photo_{i}.jpg" for i in range(8)]),  # datasets cuts it in two
        ("validation_dir", [f"train_{i}.jpg" for i in range(8)]),
    ],
)
def test_imagefolder_files_named_after_another_split_stay_in_the_flags_split(tmp_path, flag, names):
    rows = image_folder(tmp_path / "photos", names)
    loaded = load_caption_data(data_args(**{flag: str(tmp_path / "photos")}, caption_column="captions"))
    split = flag.removesuffix("_dir")
    assert list(loaded) == [split]
    assert sorted(map(tuple, loaded[split]["captions"])) == sorted(tuple(row["captions"]) for row in rows)


# ---- captions are strings -------------------------------------------------------------------------------------------
def annotation_file(tmp_path, second_row: str, name="train.jsonl") -> Path:
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    (tmp_path / name).write_text(json.dumps({"image": "a.jpg", "caption": "a photo"}) + "\n" + second_row + "\n")
    return tmp_path / name


@pytest.mark.parametrize(
    "captions, what",
    [
        ({"en": "a dog"}, "a dict"),
        ([["a dog", "a cat"]], "caption 0 is a list"),
        (3, "a number"),
        (["a dog", None], "caption 1 is None"),
        (True, "a bool"),
        ([1.5], "caption 0 is a number"),
    ],
)
def test_captions_that_are_not_strings_are_refused_naming_the_row(tmp_path, captions, what):
    path = annotation_file(tmp_path, json.dumps({"image": "a.jpg", "caption": captions}))
    with pytest.raises(ValueError, match=rf"train\.jsonl, row 2: .*{what}.*a string or a list of strings"):
        read_annotation_file(str(path), "image", "caption", None)


@pytest.mark.parametrize(
    "row, what",
    [
        ('["a.jpg", "a dog"]', "a JSON array, not an object"),
        ('"a dog"', "a string, not an object"),
        ("3", "a number, not an object"),
        ("null", "None, not an object"),
    ],
)
def test_rows_that_are_not_json_objects_are_refused_naming_the_row(tmp_path, row, what):
    path = annotation_file(tmp_path, row)
    with pytest.raises(ValueError, match=rf"train\.jsonl, row 2: {what}"):
        read_annotation_file(str(path), "image", "caption", None)


@pytest.mark.parametrize(
    "second, what",
    [
        ({"image": "b.jpg", "caption": "a dog"}, "no value"),
        ({"image": "b.jpg", "caption": "a dog", "id": None}, "no value"),
        ({"image": "b.jpg", "caption": "a dog", "id": " "}, "an empty value"),
    ],
)
def test_an_id_missing_from_a_later_row_is_refused_naming_the_row(tmp_path, second, what):
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / name)
    path = tmp_path / "train.jsonl"
    rows = [{"image": "a.jpg", "caption": "a photo", "id": "p1"}, second]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=rf"train\.jsonl, row 2: {what} in the id column 'id' \(--id_column\)"):
        read_annotation_file(str(path), "image", "caption", "id")


def test_an_id_missing_from_a_csv_row_is_refused_naming_the_line(tmp_path):
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    (tmp_path / "train.csv").write_text("image,caption,id\na.jpg,a photo,p1\na.jpg,a dog\n")  # a short line
    with pytest.raises(ValueError, match=r"train\.csv, row 3: no value in the id column 'id'"):
        read_annotation_file(str(tmp_path / "train.csv"), "image", "caption", "id")


@pytest.mark.parametrize("escaped", ["caf\\udce9.jpg", "caf\\ud800.jpg"], ids=["latin-1-byte", "lone-surrogate"])
def test_an_image_name_that_is_not_valid_utf8_is_refused_naming_the_row(tmp_path, escaped):
    """JSON can spell names no UTF-8 text holds: a Latin-1 file name as Python reads it, or a lone surrogate."""
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], os.fsencode(tmp_path) + b"/caf\xe9.jpg")  # a real non-UTF-8 name
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"image": "a.jpg", "caption": "a photo"}) + '\n{"image": "' + escaped + '", "caption": "a dog"}\n'
    )
    with pytest.raises(
        ValueError,
        match=r"train\.jsonl, row 2: image path 'caf\\ud[8c][0e][09]\.jpg' is not valid "
        r"UTF-8.*Rename the file",
    ):
        read_annotation_file(str(path), "image", "caption", None)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_an_annotation_naming_a_fifo_or_a_directory_is_refused_before_anything_opens_it(tmp_path, kind):
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    if kind == "fifo":
        os.mkfifo(tmp_path / "b.jpg")  # opened, it would block until a writer came
    else:
        (tmp_path / "b.jpg").mkdir()
    path = annotation_file(tmp_path, json.dumps({"image": "b.jpg", "caption": "a dog"}))
    expected = "a FIFO \\(named pipe\\)" if kind == "fifo" else "a directory"
    with pytest.raises(
        ValueError,
        match=rf"train\.jsonl, row 2: image path 'b\.jpg': it is {expected}, not a regular "
        r"file",
    ):
        read_annotation_file(str(path), "image", "caption", None)


def test_an_annotation_naming_a_file_too_long_for_the_file_system_says_so(tmp_path):
    path = annotation_file(tmp_path, json.dumps({"image": "x" * 296 + ".jpg", "caption": "a dog"}))
    with pytest.raises(
        ValueError,
        match=r"train\.jsonl, row 2: .*the file name is too long for the file system "
        r"\(300 characters",
    ):
        read_annotation_file(str(path), "image", "caption", None)


# ---- image ids -----------------------------------------------------------------------------------------------------
def test_images_with_one_base_name_in_two_folders_get_two_ids_their_paths_in_the_data(tmp_path):
    photos = sorted(PHOTOS.glob("*.jpg"))
    for folder, photo in (("beach", photos[0]), ("park/2024", photos[1])):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(photo, tmp_path / folder / "photo.jpg")
    rows = [
        {"image": "beach/photo.jpg", "caption": "a beach"},
        {"image": "park/2024/photo.jpg", "caption": "a park"},
        {"image": str(tmp_path / "beach" / "photo.jpg"), "caption": "sand"},
    ]  # absolute: the same image
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    loaded = load_caption_data(data_args(train_file=str(tmp_path / "train.jsonl")))["train"]
    assert list(loaded["image_id"]) == ["beach/photo.jpg", "park/2024/photo.jpg"]
    assert list(loaded["captions"]) == [["a beach", "sand"], ["a park"]]


def test_one_id_for_two_images_in_the_id_column_is_refused_naming_both_rows(tmp_path):
    photos = sorted(PHOTOS.glob("*.jpg"))
    shutil.copy(photos[0], tmp_path / "a.jpg")
    shutil.copy(photos[1], tmp_path / "b.jpg")
    rows = [
        {"image": "a.jpg", "caption": "one", "id": "x"},
        {"image": "a.jpg", "caption": "two", "id": "x"},
        {"image": "b.jpg", "caption": "three", "id": "x"},
    ]  # rows 1 and 2 are one image: one id is right
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(
        ValueError,
        match=r"train\.jsonl, row 3: id 'x' \(--id_column id\) is already the id of "
        r"another image \(row 1, a\.jpg\)",
    ):
        read_annotation_file(str(tmp_path / "train.jsonl"), "image", "caption", "id")


def test_two_ids_for_one_image_in_the_id_column_are_refused_naming_the_row(tmp_path):
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    rows = [{"image": "a.jpg", "caption": "one", "id": "x"}, {"image": "a.jpg", "caption": "two", "id": "y"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=r"train\.jsonl, row 2: image a\.jpg has the id 'y' here and 'x' above"):
        read_annotation_file(str(tmp_path / "train.jsonl"), "image", "caption", "id")


def test_a_parquet_id_column_naming_two_images_alike_is_refused(tmp_path):
    folder = write_parquet(
        tmp_path / "photos",
        {
            "image": [{"bytes": photo_bytes(i), "path": None} for i in range(3)],
            "caption": [["a"], ["b"], ["c"]],
            "name": ["p1", "p2", "p1"],
        },
        features=datasets.Features({**FEATURES, "name": datasets.Value("string")}),
    )
    with pytest.raises(ValueError, match=r"train split: id 'p1' \(--id_column name\) names rows 0 and 2"):
        load_caption_data(
            data_args(dataset_name=str(folder), dataset_revision=None, split_column=None, id_column="name")
        )


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_given_as_jsonl_is_refused_saying_so(tmp_path, indent):
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], tmp_path / "a.jpg")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "a.jpg", "caption": "a photo"}], indent=indent))
    with pytest.raises(ValueError, match=r"train\.json, row 1: .*JSON array.*one JSON object per line"):
        read_annotation_file(str(tmp_path / "train.json"), "image", "caption", None)


def test_non_string_captions_in_imagefolder_metadata_are_refused_naming_the_row(tmp_path):
    folder = tmp_path / "photos"
    image_folder(folder)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "captions": {"en": "a bus"}})  # datasets would make it a struct
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl, row 3: the captions are a dict"):
        load_caption_data(data_args(train_dir=str(folder), caption_column="captions"))


@pytest.mark.parametrize(
    "captions, feature, what",
    [
        (
            [[["a", "b"]], [["c"]]],
            datasets.List(datasets.List(datasets.Value("string"))),
            "row 0: caption 0 is a list",
        ),
        ([{"en": "a"}, {"en": "b"}], {"en": datasets.Value("string")}, "row 0: the captions are a dict"),
        ([1, 2], datasets.Value("int64"), "row 0: the captions are a number"),
        ([["a"], ["b", None]], datasets.List(datasets.Value("string")), "row 1: caption 1 is None"),
    ],
)
def test_non_string_captions_in_a_parquet_data_set_are_refused_naming_the_row(tmp_path, captions, feature, what):
    entries = [{"bytes": photo_bytes(i), "path": f"{i}.jpg"} for i in range(2)]
    features = datasets.Features({"image": datasets.Image(), "caption": feature})
    folder = write_parquet(tmp_path / "parquet", {"image": entries, "caption": captions}, features)
    with pytest.raises(ValueError, match=rf"{folder}, train split, {what}"):
        load_parquet_folder(folder)


# ---- no split left empty --------------------------------------------------------------------------------------------
def test_a_split_left_without_captions_is_an_error_naming_it():
    blank = datasets.Dataset.from_dict({"image_id": ["a", "b"], "captions": [["", " \x00 "], []]})
    with pytest.raises(ValueError, match=r"The validation split has no image left: all 2 had only empty captions"):
        remove_empty_captions(blank, "validation")


def test_a_split_left_without_readable_images_stops_the_run_before_training(tmp_path):
    folder = tmp_path / "data"
    (folder / "broken").mkdir(parents=True)
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], folder / "a.jpg")
    (folder / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "a photo"}) + "\n")
    with open(folder / "validation.jsonl", "w") as file:
        for i in range(3):
            (folder / "broken" / f"{i}.jpg").write_text("<html>404 Not Found</html>")
            file.write(json.dumps({"image": f"broken/{i}.jpg", "caption": "a photo"}) + "\n")
    with pytest.raises(ValueError, match=r"The validation split has no image left: all 3 are unreadable"):
        run(
            tmp_path / "out",
            "--do_train",
            "--do_eval",
            "--max_steps",
            "1",
            "--train_file",
            str(folder / "train.jsonl"),
            "--validation_file",
            str(folder / "validation.jsonl"),
        )
    assert not (tmp_path / "out" / "train_results.json").exists()


def test_drop_unreadable_images_refuses_to_return_an_empty_split(tmp_path):
    dataset = read_annotation_file(str(annotation_file(tmp_path, "")), "image", "caption", None)  # one row: a.jpg
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"The train split has no image left: all 1 are unreadable"):
        drop_unreadable_images(dataset, "train")


def test_a_row_whose_image_is_null_is_dropped_by_the_up_front_check_naming_its_id(caplog):
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    dataset = datasets.Dataset.from_dict(
        {"image_id": ["kept", "empty"], "image": [str(photo), None], "captions": [["a photo"], ["nothing"]]},
        features=datasets.Features(
            {
                "image_id": datasets.Value("string"),
                "image": datasets.Image(),
                "captions": datasets.List(datasets.Value("string")),
            }
        ),
    )
    checked = drop_unreadable_images(dataset, "train")
    assert checked.with_format(None)["image_id"] == ["kept"]
    assert "Cannot load image empty" in caplog.text


# ---- the feature cache is keyed by content --------------------------------------------------------------------------
def test_a_photo_replaced_under_the_same_name_is_encoded_again(make_model, processor, tmp_path):
    folder = tmp_path / "photos"
    image_folder(folder)
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"image": f"photos/{row['file_name']}", "caption": "x"}) + "\n" for row in photo_rows())
    )
    model = make_model()
    calls = counting(model)
    first = add_vision_features(
        read_annotation_file(str(tmp_path / "train.jsonl"), "image", "caption", None),
        model,
        processor,
        tmp_path / "cache",
    )
    target = folder / photo_rows()[0]["file_name"]
    stat = target.stat()
    replaced = bytearray(target.read_bytes())
    replaced[len(replaced) // 2 : len(replaced) // 2 + 64] = bytes(64)  # other pixels, same size
    target.write_bytes(bytes(replaced))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time, as `cp -p` keeps it
    calls.clear()
    again = add_vision_features(
        read_annotation_file(str(tmp_path / "train.jsonl"), "image", "caption", None),
        model,
        processor,
        tmp_path / "cache",
    )
    assert sum(calls) == 8 and again.cache_files != first.cache_files
    expected = model.get_vision_embeds(processor(images=[load_image(target)])["pixel_values"])  # the cache's path
    torch.testing.assert_close(torch.as_tensor(again[0]["vision_embeds"])[None], expected)


def test_images_given_as_bytes_are_keyed_by_their_bytes(make_model, processor, tmp_path):
    a, b = load_embedded_dataset(4, 0, 0, seed=0)["train"], load_embedded_dataset(4, 0, 0, seed=1)["train"]
    b._fingerprint = a._fingerprint  # as when a file keeps its name (and so its fingerprint) but not its content
    model = make_model()
    files_a = add_vision_features(a, model, processor, tmp_path).cache_files
    assert files_a != add_vision_features(b, model, processor, tmp_path).cache_files


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(make_model, processor, tmp_path, caplog, damage):
    dataset = load_embedded_dataset(8, 0, 0)["train"]
    model = make_model()
    calls = counting(model)
    first = add_vision_features(dataset, model, processor, tmp_path)
    expected = np.stack(first["vision_embeds"])
    cache = Path(first.cache_files[0]["filename"])
    content = bytearray(cache.read_bytes())
    if damage == "truncated":
        del content[len(content) * 2 // 3 :]
    else:
        content[len(content) // 2] ^= 0xFF
    del first
    cache.write_bytes(bytes(content))
    calls.clear()
    with caplog.at_level("WARNING"):
        again = add_vision_features(dataset, model, processor, tmp_path)
    assert f"{cache} is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert sum(calls) == 8
    np.testing.assert_array_equal(np.stack(again["vision_embeds"]), expected)


# ---- the decode budget --------------------------------------------------------------------------------------------
def write_png16(path, width, height):
    """A black 16-bit greyscale PNG of any size, streamed through zlib (no pixel buffer)."""

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row, compressor = bytes(1 + 2 * width), zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_small_16bit_png_declaring_64_megapixels_is_refused_before_decoding(tmp_path):
    path = write_png16(tmp_path / "grey16.png", 8000, 7999)  # under the 64 MP cap, ~1.8 GB through decode + RGB
    assert path.stat().st_size < 200_000 and Image.open(path).mode == "I;16"
    with pytest.raises(
        ImageLoadError,
        match=r"grey16\.png: decoding it takes about 1,792 MB \(8000×7999 pixels × 28 "
        r"bytes for mode I;16\), over the budget of 768 MB",
    ):
        load_image(path)


def test_the_decode_budget_counts_the_bytes_per_pixel_of_each_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 100 * 12)  # 100 pixels of 8-bit RGB
    for mode, fits in (("RGB", True), ("L", True), ("RGBA", False), ("I;16", False), ("F", False)):
        path = tmp_path / f"{mode.replace(';', '')}.{'tiff' if mode == 'F' else 'png'}"
        Image.new(mode, (10, 10)).save(path)
        if fits:
            assert load_image(path).size == (10, 10)
        else:
            with pytest.raises(ImageLoadError, match="over the budget of 0 MB"):
                load_image(path)


def test_load_image_reads_file_objects(tmp_path):
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    with open(photo, "rb") as file:
        assert load_image(file).size == Image.open(photo).size
    (tmp_path / "page.jpg").write_text("<html>404</html>")
    with open(tmp_path / "page.jpg", "rb") as file, pytest.raises(ImageLoadError, match=r"page\.jpg: it is HTML"):
        load_image(file)


# ---- images gone during a run ---------------------------------------------------------------------------------------
def delete_after_the_check(monkeypatch, *paths: Path):
    prepare = run_captioning.prepare_data

    def prepare_then_delete(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        for path in paths:
            path.unlink()  # after the up-front check, before the first batch that needs it
        return prepared

    monkeypatch.setattr(run_captioning, "prepare_data", prepare_then_delete)


def test_an_image_deleted_during_a_run_is_left_out_named_and_counted(tmp_path, monkeypatch, caplog):
    rows = image_folder(tmp_path / "photos")
    gone = tmp_path / "photos" / rows[5]["file_name"]
    delete_after_the_check(monkeypatch, gone)
    folder = str(tmp_path / "photos")
    # one image a step: the step of the lost one has no row left, and trains nothing
    metrics = run(
        tmp_path / "out",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "8",
        "--per_device_train_batch_size",
        "1",
        "--train_dir",
        folder,
        "--validation_dir",
        folder,
        "--caption_column",
        "captions",
        "--use_feature_cache",
        "False",
    )
    # 1 of 8 images: within the tolerated share (at least one image); every pass reads it and leaves it out
    assert metrics["train_lost_images"] == metrics["eval_lost_images"] == 1
    assert metrics["eval_num_images"] == 8
    predicted = [json.loads(line)["image_id"] for line in (tmp_path / "out" / "predictions_validation.jsonl").open()]
    assert len(predicted) == 7 and rows[5]["file_name"] not in predicted
    assert all(map(math.isfinite, (metrics["train_loss"], metrics["eval_loss"], metrics["eval_cider"])))
    named = [r.getMessage() for r in caplog.records if str(gone) in r.getMessage()]
    assert named and all("the file cannot be read" in message for message in named)


def test_past_the_tolerated_share_of_lost_images_the_run_stops_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    rows = image_folder(tmp_path / "photos")
    # two of eight: past the share; the run stops when it meets the second, with a checkpoint of the steps before
    gone = [tmp_path / "photos" / rows[i]["file_name"] for i in (6, 7)]
    delete_after_the_check(monkeypatch, *gone)
    flags = (
        "--do_train",
        "--max_steps",
        "4",
        "--train_dir",
        str(tmp_path / "photos"),
        "--caption_column",
        "captions",
        "--use_feature_cache",
        "False",
        "--save_strategy",
        "steps",
        "--save_steps",
        "10",
    )
    stopped = (
        r"2 training image\(s\) .*: more than the run tolerates, 1% of its images and at least one \(1\).* "
        r"after step \d, whose checkpoint is saved in .*checkpoint-\d\. Rerun the same command to resume"
    )
    with pytest.raises(SystemExit, match=stopped):
        run(tmp_path / "out", *flags)
    saved = checkpoints.last_complete_checkpoint(tmp_path / "out")
    assert saved is not None
    for path, row in zip(gone, (rows[6], rows[7])):  # restored: the rerun resumes from the step saved
        shutil.copy(PHOTOS / row["file_name"], path)
    monkeypatch.undo()
    metrics = run(tmp_path / "out", *flags)
    assert metrics["train_lost_images"] == 0 and math.isfinite(metrics["train_loss"])


def test_the_collator_loads_undecoded_entries_through_the_same_checks(processor, tmp_path, caplog):
    collator = CaptionCollator(processor)
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    batch = collator(
        [
            {"image_id": "a", "image": {"bytes": None, "path": str(photo)}, "captions": ["a photo"]},
            {"image_id": "b", "image": {"bytes": None, "path": str(tmp_path / "gone.jpg")}, "captions": ["x"]},
        ]
    )
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 1
    assert batch["lost_images"] == ["b"]
    assert f"{tmp_path / 'gone.jpg'}: the file cannot be read" in caplog.text
    # a batch that lost every row holds only the count
    assert collator([{"image_id": "b", "image": None, "captions": ["x"]}]) == {"lost_images": ["b"]}


def test_a_parquet_folder_split_by_column_keeps_files_whose_names_name_no_split(tmp_path):
    # Flickr8k's layout: shards named 0000.parquet, and a test shard added beside them under another name
    from clipqwen.data.sources import load_hub_dataset, split_by_column

    def shard(name, splits):
        rows = {"caption": [["a dog."]] * len(splits), "split": splits}
        datasets.Dataset.from_dict(rows).to_parquet(tmp_path / name)

    shard("0000.parquet", ["train", "train", "val"])
    shard("test-0000.parquet", ["test"])
    raw = load_hub_dataset(str(tmp_path), None, None, cache_dir=str(tmp_path / "cache"), one_split=True)
    sizes = {split: len(rows) for split, rows in split_by_column(raw, "split", str(tmp_path)).items()}
    assert sizes == {"train": 2, "validation": 1, "test": 1}
