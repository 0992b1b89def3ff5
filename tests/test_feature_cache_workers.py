"""The feature cache decodes each image once (the unreadable-image check is the same pass), by several worker
processes, with features bit-identical to one process (issue 11)."""

import json
import logging
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import ImageFile

import run_captioning
from clipqwen.data import cleaning, feature_cache
from clipqwen.data.feature_cache import Processes, add_vision_features
from clipqwen.data.sources import read_annotation_file
from clipqwen.images import load_image
from clipqwen.publishing import export

from conftest import PHOTOS, TINY


def photo_set(folder, broken=("broken-0.jpg",)):
    """The 8 photos (each under two names, 16 images) and `broken` files, with a train.jsonl listing them all."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, photo in enumerate(sorted(PHOTOS.glob("*.jpg"))):
        for copy in ("a", "b"):
            shutil.copy(photo, folder / f"{copy}{i}.jpg")
            names.append(f"{copy}{i}.jpg")
    for name in broken:
        (folder / name).write_text("<html>404 Not Found</html>")
    names[3:3] = list(broken)
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"image": name, "caption": f"photo {name}"}) + "\n" for name in names)
    )
    return folder / "train.jsonl", names


def count_decodes(monkeypatch, log):
    """Every `load_image` call of the feature pass, appended to a file: worker processes count too."""
    original = cleaning.load_image

    def counted(entry, name=None):
        with open(log, "a") as file:
            file.write(f"{name}\n")
        return original(entry, name=name)

    monkeypatch.setattr(cleaning, "load_image", counted)
    return lambda: Counter(log.read_text().splitlines()) if log.exists() else Counter()


def count_pixel_decodes(monkeypatch, log):
    """Every time Pillow really decodes a file's pixels (`ImageFile.load` with data left to read), by file name,
    appended to a file (worker processes count too): whoever decodes, load_image, datasets' own decoder, a sample
    picture, a conversion that reloads."""
    original = ImageFile.ImageFile.load

    def counted(self):
        if self.tile:  # pixels not read yet: this call decodes them
            with open(log, "a") as file:
                file.write(f"{self.filename or '<bytes>'}\n")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return lambda: Counter(log.read_text().splitlines()) if log.exists() else Counter()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_feature_pass_decodes_each_readable_image_exactly_once(
    make_model, processor, tmp_path, monkeypatch, workers
):
    annotations, names = photo_set(tmp_path / "data")
    dataset = read_annotation_file(str(annotations), "image", "caption", None)
    calls = count_decodes(monkeypatch, tmp_path / "calls.txt")
    decodes = count_pixel_decodes(monkeypatch, tmp_path / "decodes.txt")
    features = add_vision_features(
        dataset, make_model(), processor, tmp_path / "cache", batch_size=4, num_workers=workers
    )
    readable = [name for name in names if name != "broken-0.jpg"]
    assert decodes() == Counter({str(tmp_path / "data" / name): 1 for name in readable})
    assert calls() == Counter({str(tmp_path / "data" / name): 1 for name in names})  # the check is the same pass
    assert list(features["image_id"]) == readable


@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_first_run_decodes_each_image_once_and_the_second_none(tmp_path, monkeypatch, caplog, workers):
    annotations, names = photo_set(tmp_path / "data")
    decodes = count_decodes(monkeypatch, tmp_path / "decodes.txt")
    pixel_decodes = count_pixel_decodes(monkeypatch, tmp_path / "pixel-decodes.txt")
    flags = [
        *TINY,
        "--do_train",
        "--max_steps",
        "1",
        "--train_file",
        str(annotations),
        "--preprocessing_num_workers",
        workers,
        "--feature_cache_dir",
        str(tmp_path / "features"),
    ]
    with caplog.at_level(logging.WARNING):
        run_captioning.main(run_captioning.parse_args([*flags, "--output_dir", str(tmp_path / "first")]))
    counts = decodes()
    assert counts == Counter({str(tmp_path / "data" / name): 1 for name in names})  # 17 images, one decode each
    assert pixel_decodes() == Counter({str(tmp_path / "data" / name): 1 for name in names if name != "broken-0.jpg"})
    broken = tmp_path / "data" / "broken-0.jpg"
    skipped = f"train: skipping 1 unreadable image(s) of 17:\n  Cannot load image {broken}: it is HTML/XML text"
    assert skipped in caplog.text
    metrics = json.loads((tmp_path / "first" / "all_results.json").read_text())
    assert metrics.get("train_loss") is not None

    (tmp_path / "decodes.txt").unlink()
    (tmp_path / "pixel-decodes.txt").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_captioning.main(run_captioning.parse_args([*flags, "--output_dir", str(tmp_path / "again")]))
    assert decodes() == Counter() and pixel_decodes() == Counter()  # read back, the unreadable one still named
    assert "train: skipping 1 unreadable image(s) of 17" in caplog.text and str(broken) in caplog.text


@pytest.mark.parametrize("batch_size, chunk", [(5, 16), (12, 5)])  # (12, 5): batches of 12 and 4, cut in 5 5 2 | 4
def test_features_with_two_workers_equal_features_with_one(
    make_model, processor, tmp_path, monkeypatch, batch_size, chunk
):
    monkeypatch.setattr(feature_cache, "DECODE_CHUNK", chunk)  # images a worker decodes at a time
    annotations, names = photo_set(tmp_path / "data", broken=())
    dataset = read_annotation_file(str(annotations), "image", "caption", None)
    model = make_model()
    runs = {
        workers: add_vision_features(
            dataset, model, processor, tmp_path / f"cache-{workers}", batch_size=batch_size, num_workers=workers
        )
        for workers in (0, 1, 2)
    }
    stacked = {workers: torch.as_tensor(np.stack(run["vision_embeds"])) for workers, run in runs.items()}
    assert torch.equal(stacked[1], stacked[2]) and torch.equal(stacked[0], stacked[2])
    names_of = {
        workers: [part["filename"].rsplit("/", 1)[1] for part in run.cache_files] for workers, run in runs.items()
    }
    assert names_of[0] == names_of[1] == names_of[2]  # the key does not depend on the number of workers
    # the same as one process doing it by hand: load_image, the processor's pixel values, the vision tower, batch by
    # batch (how far they may differ from the image processor's own: tests/test_images.py)
    with torch.no_grad():
        expected = torch.cat(
            [
                model.get_vision_embeds(
                    processor(
                        images=[load_image(str(tmp_path / "data" / name)) for name in names[start:][:batch_size]]
                    )["pixel_values"]
                )
                for start in range(0, 16, batch_size)
            ]
        )
    assert torch.equal(stacked[2], expected)
    assert list(runs[2]["image_id"]) == names and "image" not in runs[2].column_names


def test_unreadable_images_are_dropped_and_named_and_an_empty_split_is_an_error(
    make_model, processor, tmp_path, caplog
):
    annotations, names = photo_set(tmp_path / "data", broken=("broken-0.jpg", "empty.jpg"))
    (tmp_path / "data" / "empty.jpg").write_bytes(b"")
    dataset = read_annotation_file(str(annotations), "image", "caption", None)
    model = make_model()
    with caplog.at_level(logging.WARNING):
        features = add_vision_features(
            dataset, model, processor, tmp_path / "cache", batch_size=4, num_workers=2, split="validation"
        )
    assert "validation: skipping 2 unreadable image(s) of 18:" in caplog.text
    assert f"Cannot load image {tmp_path / 'data' / 'empty.jpg'}: the file is empty (0 bytes)" in caplog.text
    assert list(features["image_id"]) == [name for name in names if name not in ("broken-0.jpg", "empty.jpg")]
    assert len(features["vision_embeds"]) == 16

    with pytest.raises(ValueError, match=r"With the image check off, an unreadable image stops the run"):
        add_vision_features(dataset, model, processor, tmp_path / "cache", batch_size=4, drop_unreadable=False)

    only_broken = dataset.select([names.index("broken-0.jpg"), names.index("empty.jpg")])
    with pytest.raises(ValueError, match=r"The test split has no image left: all 2 are unreadable"):
        add_vision_features(only_broken, model, processor, tmp_path / "cache", num_workers=2, split="test")


def test_shards_are_merged_in_order_and_reused_by_any_number_of_processes(make_model, processor, tmp_path):
    """What each DDP rank does, one after the other here: encode its contiguous shard into its own file; then the
    merged files equal a one-process cache, and a later one-process run reuses them."""
    annotations, names = photo_set(tmp_path / "data")
    dataset = read_annotation_file(str(annotations), "image", "caption", None)
    model = make_model()
    single = add_vision_features(dataset, model, processor, tmp_path / "one", batch_size=4)

    class Built(Exception):
        pass

    def stop_here():  # ranks 0 and 1 stop at the barrier; rank 2, the last, passes it and reads all three shards
        raise Built

    for rank in (0, 1):
        with pytest.raises(Built):
            add_vision_features(
                dataset, model, processor, tmp_path / "three", batch_size=4, processes=Processes(rank, 3, 0, stop_here)
            )
    last = add_vision_features(
        dataset, model, processor, tmp_path / "three", batch_size=4, processes=Processes(2, 3, 0, lambda: None)
    )
    assert list(last["image_id"]) == list(single["image_id"])
    shards = sorted(path.name for path in (tmp_path / "three").glob("*.arrow"))
    assert len(shards) == 3 and all("-of-3.arrow" in name for name in shards)
    calls = []
    original = model.get_vision_embeds
    model.get_vision_embeds = lambda pixel_values: calls.append(len(pixel_values)) or original(pixel_values)
    merged = add_vision_features(dataset, model, processor, tmp_path / "three", batch_size=4)  # one process now
    assert calls == [] and len(merged.cache_files) == 3
    assert list(merged["image_id"]) == list(single["image_id"])
    np.testing.assert_array_equal(np.stack(merged["vision_embeds"]), np.stack(single["vision_embeds"]))


def test_evaluation_without_the_cache_decodes_each_image_once_per_pass(tmp_path, monkeypatch):
    # two passes need the pixels: the test loss (one pair per caption, one caption each here) and the generated
    # captions. The references and ids come from the table, not from the rows: read through the image-decoding
    # format, each of those reads decoded the image again (4 decodes per image)
    annotations, names = photo_set(tmp_path / "data", broken=())
    pixel_decodes = count_pixel_decodes(monkeypatch, tmp_path / "pixel-decodes.txt")
    flags = [
        *TINY,
        "--do_predict",
        "--test_file",
        str(annotations),
        "--use_feature_cache",
        "False",
        "--check_images",
        "False",
        "--max_new_tokens",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    monkeypatch.setattr(export, "plot_samples", lambda *args, **kwargs: None)  # the grid decodes 8 more
    metrics = run_captioning.main(run_captioning.parse_args(flags))
    assert metrics["test_num_images"] == len(names)
    assert pixel_decodes() == Counter({str(tmp_path / "data" / name): 2 for name in names})
