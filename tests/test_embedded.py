"""The embedded shapes data set: deterministic, the right sizes, and captions that agree with the pixels."""

import datasets
import numpy as np
import pytest

from clipqwen.data.embedded import (
    BACKGROUNDS,
    COLOURS,
    NUM_CAPTIONS,
    POSITIONS,
    SHAPES,
    caption_facts,
    load_embedded_dataset,
    save_embedded_imagefolder,
)


SMALL = dict(num_train=12, num_validation=6, num_test=6)


@pytest.fixture(scope="module")
def default_dataset():
    return load_embedded_dataset()


def pixels(dataset):
    return [np.asarray(image) for image in dataset["image"]]


def facts_from_pixels(image) -> dict:
    """Read colour, shape, position and background back from the picture alone."""
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    corners = np.stack([array[0, 0], array[0, -1], array[-1, 0], array[-1, -1]])
    background_rgb = np.median(corners, axis=0)
    background = min(BACKGROUNDS, key=lambda name: np.abs(np.subtract(BACKGROUNDS[name], background_rgb)).sum())
    mask = np.abs(array - background_rgb).max(axis=-1) > 60
    ys, xs = np.nonzero(mask)
    shape_rgb = np.median(array[mask], axis=0)
    colour = min(COLOURS, key=lambda name: np.abs(np.subtract(COLOURS[name], shape_rgb)).sum())
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))  # square 1, circle π/4, triangle ½
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    centre_x = xs.mean() / array.shape[1]
    position = "left" if centre_x < 0.4 else "right" if centre_x > 0.6 else None
    return dict(colour=colour, shape=shape, position=position, background=background)


def test_default_sizes_columns_and_features(default_dataset):
    assert list(default_dataset) == ["train", "validation", "test"]
    assert {split: len(ds) for split, ds in default_dataset.items()} == dict(train=600, validation=60, test=60)
    for split, ds in default_dataset.items():
        assert ds.column_names == ["image_id", "image", "captions"]
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["captions"] == datasets.List(datasets.Value("string"))
        assert ds[0]["image_id"] == f"shapes-{split}-00000"
        assert len(set(ds["image_id"])) == len(ds)
    image = default_dataset["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (224, 224)


def test_five_captions_each_consistent_with_the_first(default_dataset):
    for ds in default_dataset.values():
        for captions in ds["captions"]:
            assert len(captions) == NUM_CAPTIONS and all(isinstance(c, str) and c for c in captions)
            assert len(set(captions)) == NUM_CAPTIONS
            full = caption_facts(captions[0])
            assert None not in full.values(), captions[0]  # the canonical caption states every fact
            for caption in captions[1:]:
                stated = {k: v for k, v in caption_facts(caption).items() if v is not None}
                assert stated["colour"] == full["colour"] and stated["shape"] == full["shape"], caption
                assert stated.items() <= full.items(), caption


def test_captions_agree_with_pixels(default_dataset):
    for split, ds in default_dataset.items():
        for row in ds:
            assert facts_from_pixels(row["image"]) == caption_facts(row["captions"][0]), (split, row["image_id"])


def test_attribute_combinations_are_balanced(default_dataset):
    combos = [tuple(caption_facts(captions[0]).values()) for captions in default_dataset["train"]["captions"]]
    counts = {combo: combos.count(combo) for combo in set(combos)}
    assert len(counts) == len(COLOURS) * len(SHAPES) * len(POSITIONS) * len(BACKGROUNDS)  # 72
    assert max(counts.values()) - min(counts.values()) <= 1


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = (load_embedded_dataset(**SMALL, seed=seed) for seed in (0, 0, 1))
    for split in first:
        assert first[split]["captions"] == again[split]["captions"]
        assert first[split]["image_id"] == again[split]["image_id"]
        assert all(np.array_equal(a, b) for a, b in zip(pixels(first[split]), pixels(again[split])))
        assert first[split]["captions"] != other[split]["captions"]
        assert not any(np.array_equal(a, b) for a, b in zip(pixels(first[split]), pixels(other[split])))


def test_images_differ_and_splits_are_independent():
    small = load_embedded_dataset(num_train=5, num_validation=3, num_test=2)
    large = load_embedded_dataset(num_train=80, num_validation=4, num_test=3)
    assert {split: len(ds) for split, ds in small.items()} == dict(train=5, validation=3, test=2)
    for split in small:  # a split does not depend on the other splits' sizes; a smaller one is a prefix
        n = len(small[split])
        assert small[split]["captions"] == large[split]["captions"][:n]
        assert all(np.array_equal(a, b) for a, b in zip(pixels(small[split]), pixels(large[split])[:n]))
    train = [a.tobytes() for a in pixels(large["train"])]
    assert len(set(train)) == len(train)  # the same attributes come with different jitter
    assert set(train).isdisjoint(a.tobytes() for a in pixels(large["validation"]) + pixels(large["test"]))


def test_without_positions_and_other_image_size():
    ds = load_embedded_dataset(num_train=20, num_validation=0, num_test=0, positions=False, image_size=96)
    assert len(ds["validation"]) == 0
    for row in ds["train"]:
        assert row["image"].size == (96, 96)
        assert all(caption_facts(c)["position"] is None for c in row["captions"])
        assert facts_from_pixels(row["image"]) == {**caption_facts(row["captions"][0]), "position": None}


def test_caption_facts():
    assert caption_facts("An orange square on the left of a black background.") == dict(
        colour="orange", shape="square", position="left", background="black"
    )
    assert caption_facts("a white background with a blue circle on the right side.") == dict(
        colour="blue", shape="circle", position="right", background="white"
    )
    assert caption_facts("A green triangle on white.") == dict(
        colour="green", shape="triangle", position=None, background="white"
    )
    assert caption_facts("a dog") == dict(colour=None, shape=None, position=None, background=None)


def test_imagefolder_round_trip(tmp_path):
    root = save_embedded_imagefolder(tmp_path / "shapes", **SMALL, seed=3)
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "validation"]
    assert (root / "train" / "metadata.jsonl").exists()
    expected = load_embedded_dataset(**SMALL, seed=3)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert set(loaded) == set(expected)
    for split in expected:
        ds = loaded[split]
        ds = ds.select(np.argsort(ds["image_id"]))  # imagefolder does not promise an order
        assert len(ds) == len(expected[split])
        assert ds["image_id"] == expected[split]["image_id"]
        assert ds["captions"] == expected[split]["captions"]
        assert all(np.array_equal(a, b) for a, b in zip(pixels(ds), pixels(expected[split])))
