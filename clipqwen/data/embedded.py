"""The embedded "shapes" data set: captioned pictures drawn in code, so the main job runs offline.

Deterministic for a seed, with our Flickr30K columns (`image_id`, `image`, five `captions`). A
picture is one filled shape on a plain background; each caption states some of its colour, shape,
position (left/right half; centred with `positions=False`) and background, ``captions[0]`` all of
them. `caption_facts` reads them back out of any caption. Why it is learnable: docs/training.md.

    >>> from clipqwen.data.embedded import load_embedded_dataset, save_embedded_imagefolder
    >>> ds = load_embedded_dataset()                 # DatasetDict: train 600 / validation 60 / test 60
    >>> save_embedded_imagefolder("shapes")          # the same data as an imagefolder with metadata.jsonl
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 150, 30),
    "yellow": (245, 225, 50),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "black": (12, 12, 12)}

SPLITS: tuple[str, ...] = ("train", "validation", "test")
NUM_CAPTIONS = 5
DATASET_NAME = "shapes"

# {a_colour} is "a red" / "an orange"; {A_colour} the same capitalised. captions[0] uses the first template.
TEMPLATES_WITH_POSITION: tuple[str, ...] = (
    "{a_colour} {shape} on the {position} of a {background} background.",
    "{a_colour} {shape} on a {background} background.",
    "{A_colour} {shape} on the {position}.",
    "a picture of {a_colour} {shape} on the {position}.",
    "a {background} background with {a_colour} {shape} on the {position} side.",
    "there is {a_colour} {shape} on the {position}.",
    "{A_colour} {shape}.",
    "an image of {a_colour} {shape} against a {background} background.",
    "the {colour} {shape} is on the {position} side of the picture.",
)
TEMPLATES_CENTRED: tuple[str, ...] = (
    "{a_colour} {shape} on a {background} background.",
    "{A_colour} {shape}.",
    "a picture of {a_colour} {shape}.",
    "a {background} background with {a_colour} {shape} in the middle.",
    "there is {a_colour} {shape} in the picture.",
    "an image of {a_colour} {shape} against a {background} background.",
    "A {colour} {shape} on {background}.",
    "a simple drawing of {a_colour} {shape}.",
)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_captions(
    colour: str, shape: str, background: str, position: str | None, rng: np.random.Generator
) -> list[str]:
    """Five captions for one picture: the canonical full description first, then four other templates."""
    templates = TEMPLATES_CENTRED if position is None else TEMPLATES_WITH_POSITION
    others = rng.choice(np.arange(1, len(templates)), size=NUM_CAPTIONS - 1, replace=False)
    a_colour = _article(colour)
    fields = dict(
        colour=colour,
        shape=shape,
        background=background,
        position=position,
        a_colour=a_colour,
        A_colour=a_colour[0].upper() + a_colour[1:],
    )
    return [templates[i].format(**fields) for i in (0, *others.tolist())]


def caption_facts(caption: str) -> dict[str, str | None]:
    """The facts a caption states: ``colour``, ``shape``, ``position``, ``background`` (None where absent).

    A word that names a background colour counts as the background when followed by "background" or preceded
    by "on" at the end ("on white."), otherwise as the shape's colour.
    """
    words = caption.lower().replace(".", " ").replace(",", " ").split()
    facts: dict[str, str | None] = dict(colour=None, shape=None, position=None, background=None)
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in BACKGROUNDS and (following == "background" or (i > 0 and words[i - 1] == "on")):
            facts["background"] = facts["background"] or word
        elif word in COLOURS:
            facts["colour"] = facts["colour"] or word
        elif word in SHAPES:
            facts["shape"] = facts["shape"] or word
        elif word in POSITIONS:
            facts["position"] = facts["position"] or word
    return facts


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_shape(
    colour: str, shape: str, background: str, position: str | None, rng: np.random.Generator, image_size: int = 224
) -> Image.Image:
    """One picture: a large `shape` in `colour` on the `position` half (centred if None) of `background`."""
    s = image_size
    canvas = Image.new("RGB", (s, s), _jitter_colour(BACKGROUNDS[background], rng, 6))
    draw = ImageDraw.Draw(canvas)
    fill = _jitter_colour(COLOURS[colour], rng, 12)
    size = s * rng.uniform(0.42, 0.52)  # circle diameter; the others as big: only outlines differ
    centre_x = {"left": 0.27, "right": 0.73, None: 0.5}[position] * s + rng.uniform(-0.03, 0.03) * s
    centre_y = s * (0.5 + rng.uniform(-0.1, 0.1))
    if shape == "circle":
        r = size / 2
        draw.ellipse([centre_x - r, centre_y - r, centre_x + r, centre_y + r], fill=fill)
    elif shape == "square":
        h = size * 0.45
        draw.rectangle([centre_x - h, centre_y - h, centre_x + h, centre_y + h], fill=fill)
    elif shape == "triangle":  # equilateral, pointing up, centred on its circumcentre
        r = size * 0.62
        points = [
            (centre_x + r * math.cos(a), centre_y - r * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return canvas


def generate_split(
    split: str, num_examples: int, seed: int = 0, image_size: int = 224, positions: bool = True
) -> list[dict]:
    """The examples of one split as dicts: ``image_id``, ``image`` (PIL), ``captions`` and the four facts.

    Each split has its own random stream (from `seed` and the split name), so the size of one split does not
    change another, and a smaller split is a prefix of a larger one.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    combos = [
        (c, sh, bg, pos)
        for c in COLOURS
        for sh in SHAPES
        for bg in BACKGROUNDS
        for pos in (POSITIONS if positions else (None,))
    ]
    examples = []
    while len(examples) < num_examples:  # every combination once per block, in a fresh random order
        for k in rng.permutation(len(combos)).tolist():
            if len(examples) == num_examples:
                break
            colour, shape, background, position = combos[k]
            examples.append(
                dict(
                    image_id=f"{DATASET_NAME}-{split}-{len(examples):05d}",
                    image=draw_shape(colour, shape, background, position, rng, image_size),
                    captions=make_captions(colour, shape, background, position, rng),
                    colour=colour,
                    shape=shape,
                    background=background,
                    position=position,
                )
            )
    return examples


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def load_embedded_dataset(
    num_train: int = 600,
    num_validation: int = 60,
    num_test: int = 60,
    seed: int = 0,
    *,
    image_size: int = 224,
    positions: bool = True,
):
    """The embedded shapes data set as a `datasets.DatasetDict` with splits train / validation / test.

    Columns: ``image_id`` (str, e.g. ``"shapes-train-00012"``), ``image`` (`datasets.Image()`, RGB
    `image_size`² PNG), ``captions`` (list of 5 str). Same arguments ⇒ identical pixels and captions.
    """
    import datasets

    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    splits = {}
    for split, n in zip(SPLITS, (num_train, num_validation, num_test)):
        examples = generate_split(split, n, seed, image_size, positions)
        splits[split] = datasets.Dataset.from_dict(
            {
                "image_id": [e["image_id"] for e in examples],
                "image": [{"bytes": _png_bytes(e["image"]), "path": None} for e in examples],
                "captions": [e["captions"] for e in examples],
            },
            features=features,
        )
    return datasets.DatasetDict(splits)


def save_embedded_imagefolder(
    path,
    num_train: int = 600,
    num_validation: int = 60,
    num_test: int = 60,
    seed: int = 0,
    *,
    image_size: int = 224,
    positions: bool = True,
) -> Path:
    """Write the same data as `load_embedded_dataset` as an imagefolder and return its path.

    Layout: ``path/{train,validation,test}/<image_id>.png`` plus a ``metadata.jsonl`` per split with
    ``file_name``, ``image_id`` and ``captions``; ``datasets.load_dataset("imagefolder", data_dir=path)``
    reads it back.
    """
    root = Path(path)
    for split, n in zip(SPLITS, (num_train, num_validation, num_test)):
        if n == 0:  # an empty folder would break imagefolder; the split is simply absent
            continue
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for example in generate_split(split, n, seed, image_size, positions):
                file_name = f"{example['image_id']}.png"
                example["image"].save(folder / file_name, format="PNG", compress_level=1)
                metadata.write(
                    json.dumps(
                        {"file_name": file_name, "image_id": example["image_id"], "captions": example["captions"]}
                    )
                    + "\n"
                )
    return root
