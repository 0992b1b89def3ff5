"""clipqwen.publishing.plots: valid PNGs of sensible size from a realistic Trainer log and the CC-BY photos, tolerant
of missing keys, with every caption line inside its own cell (nothing overlaps, nothing is cut at the edge)."""

import itertools
import json
import math
import random

import pytest
from PIL import Image, ImageStat

from clipqwen.publishing.plots import CELL_WIDTH, PAD, plot_sample_grid, plot_training_curves, sample_grid_figure

from conftest import PHOTOS


def fake_log_history(steps=3000, logging_steps=25, eval_steps=500):
    """What Trainer's state.log_history looks like for a captioning run with compute_metrics."""
    rng = random.Random(0)
    history = []
    for step in range(logging_steps, steps + 1, logging_steps):
        loss = 2.3 + 9.5 * math.exp(-step / 150) + 0.6 * math.exp(-step / 1500) + rng.gauss(0, 0.08)
        lr = 1e-4 * (1 - step / steps)
        history.append({"loss": loss, "grad_norm": 1.3, "learning_rate": lr, "epoch": step / 1000, "step": step})
        if step % eval_steps == 0:
            progress = 1 - math.exp(-step / 900)
            history.append(
                {
                    "eval_loss": 2.6 + 0.8 * math.exp(-step / 1200),
                    "eval_rougeL": 0.30 + 0.2 * progress,
                    "eval_bleu4": 0.08 + 0.15 * progress,
                    "eval_cider": 0.25 + 0.6 * progress,
                    "eval_gen_len": 10.2,
                    "eval_runtime": 31.0,
                    "eval_samples_per_second": 16.1,
                    "epoch": step / 1000,
                    "step": step,
                }
            )
    history.append({"train_runtime": 3600.0, "train_loss": 2.9, "epoch": steps / 1000, "step": steps})
    return history


def assert_png(path, min_size, max_size):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_size[0] <= image.width <= max_size[0] and min_size[1] <= image.height <= max_size[1], image.size
        extrema = ImageStat.Stat(image.convert("L")).extrema[0]
        assert extrema[1] - extrema[0] > 100, "the image is (nearly) blank"
        return image.size


def test_training_curves_from_a_realistic_log(tmp_path):
    path = plot_training_curves(fake_log_history(), tmp_path / "plots" / "curves.png", title="tiny run")
    assert path == tmp_path / "plots" / "curves.png"
    both = assert_png(path, (1000, 350), (2000, 800))
    train_only = [entry for entry in fake_log_history() if "loss" in entry]
    single = assert_png(plot_training_curves(train_only, tmp_path / "train.png"), (500, 350), (1000, 800))
    assert single[0] < both[0] * 0.7  # no empty metrics panel when no metrics were logged


@pytest.mark.parametrize(
    "history",
    [
        [],
        [{"train_runtime": 1.0, "step": 0}],
        [{"eval_loss": 3.1, "step": 100}, {"eval_loss": 2.9, "eval_cider": 0.2, "step": 200}],  # metrics on some evals
        [{"loss": 3.0}, {"loss": None, "step": 5}, {"loss": float("nan"), "step": 6}, {"loss": 2.5, "step": 10}],
        [{"loss": 12.0, "step": 1}, {"loss": 2.0, "step": 2}, {"eval_bleu4": 0.1, "step": 2}],  # log-scale range
    ],
)
def test_training_curves_tolerate_missing_keys(history, tmp_path):
    assert_png(plot_training_curves(history, tmp_path / "curves.png"), (500, 350), (2000, 800))


def photo_samples():
    rows = [json.loads(line) for line in (PHOTOS / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(PHOTOS / row["file_name"]) for row in rows]
    return images, [row["captions"][0] for row in rows], [row["captions"][1:] for row in rows]


def test_sample_grid_of_the_cc_by_photos(tmp_path):
    images, predictions, references = photo_samples()
    path = plot_sample_grid(images, predictions, references, tmp_path / "grid.png", columns=4, title="step 3000")
    width, height = assert_png(path, (1200, 700), (1800, 1200))  # 4 × 2 cells, landscape overall
    assert width > height
    three = plot_sample_grid(images[:3], predictions[:3], references[:3], tmp_path / "three.png")
    assert_png(three, (800, 350), (1400, 700))  # fewer images than columns: one row of three
    with pytest.raises(ValueError, match="same non-zero number"):
        plot_sample_grid(images[:2], predictions[:1], references[:2], tmp_path / "bad.png")


def test_sample_grid_text_stays_inside_its_cell(tmp_path):
    images, predictions, references = photo_samples()
    predictions[1] = "A VERY WIDE CAPTION WRITTEN WITH WIDE WORDS " * 6  # far more than four lines
    predictions[2] = ""
    predictions[3] = "Supercalifragilisticexpialidocious" * 5  # one word wider than a line
    references[4] = ["W" * 300]
    figure = sample_grid_figure(images, predictions, references, columns=4)
    figure.draw_without_rendering()
    renderer = figure._get_renderer()
    cell_width = (CELL_WIDTH - PAD) * figure.dpi
    image_boxes = {axes.get_gid(): axes.get_window_extent(renderer) for axes in figure.axes}
    figure_box = figure.bbox
    for index in range(len(images)):
        lines = [text for text in figure.texts if text.get_gid() == f"caption-{index}"]
        image = image_boxes[f"image-{index}"]
        assert 3 <= len(lines) <= 4 + 3 + 3
        boxes = [text.get_window_extent(renderer) for text in lines]
        cell_left = lines[0].get_position()[0] * figure_box.width
        for box in boxes:
            assert box.x0 >= cell_left - 1 and box.x1 <= cell_left + cell_width + 1, (index, box)
            assert box.y1 <= image.y0 + 1 and box.y0 >= 0, (index, box)  # under its image, inside the figure
            assert not any(box.overlaps(other) for gid, other in image_boxes.items() if gid != f"image-{index}")
        for upper, lower in itertools.pairwise(boxes):
            assert lower.y1 <= upper.y0 + 2  # lines do not overlap each other
    bold = [text.get_text() for text in figure.texts if text.get_gid() == "caption-1" and text.get_weight() == "bold"]
    assert len(bold) == 4 and bold[-1].endswith("…")
    assert [text.get_text() for text in figure.texts if text.get_gid() == "caption-2"][0] == "(empty caption)"
