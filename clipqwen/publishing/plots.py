"""PNG figures for a training run: loss and caption-metric curves, and a grid of sample captions.

Figures are drawn on matplotlib `Figure` objects, which render with the Agg backend on `savefig`, so nothing
here touches pyplot's global state or needs a display (works in threads, notebooks and headless CI).
"""

import math
from pathlib import Path

from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from PIL import Image

from processing_clipqwen import to_rgb


METRICS = {"eval_rougeL": "ROUGE-L", "eval_bleu4": "BLEU-4", "eval_cider": "CIDEr"}


def _series(log_history, key):
    """(steps, values) of every entry with a finite number under `key` and a step."""
    points = [
        (entry["step"], float(entry[key]))
        for entry in log_history
        if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key]) and entry.get("step") is not None
    ]
    return [step for step, _ in points], [value for _, value in points]


def _centered_mean(values, window):
    half = window // 2
    return [sum(part) / len(part) for part in (values[max(0, i - half) : i + half + 1] for i in range(len(values)))]


def plot_training_curves(log_history: list[dict], path, title: str | None = None, metrics: dict = METRICS) -> Path:
    """Loss (train and eval) and, when any were logged, caption metrics against the step, from Trainer's
    `state.log_history`. Entries without a value or a step are skipped; metrics never logged get no curve."""
    train_steps, train_loss = _series(log_history, "loss")
    eval_steps, eval_loss = _series(log_history, "eval_loss")
    metric_series = {name: _series(log_history, key) for key, name in metrics.items()}
    metric_series = {name: series for name, series in metric_series.items() if series[0]}

    columns = 2 if metric_series else 1
    figure = Figure(figsize=(6.4 * columns, 4.4), dpi=110, layout="constrained")
    loss_axes = figure.add_subplot(1, columns, 1)
    if train_loss:
        smooth = len(train_loss) >= 20
        loss_axes.plot(
            train_steps,
            train_loss,
            color="tab:blue",
            lw=1,
            alpha=0.35 if smooth else 1,
            label="train loss" + (" (raw)" if smooth else ""),
        )
        if smooth:
            window = max(3, len(train_loss) // 25 | 1)  # odd: centred
            loss_axes.plot(
                train_steps,
                _centered_mean(train_loss, window),
                color="tab:blue",
                lw=2,
                label=f"train loss (mean of {window} logs)",
            )
    if eval_loss:
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        loss_axes.plot(
            eval_steps,
            eval_loss,
            "o-",
            color="tab:orange",
            lw=2,
            ms=4,
            label=f"eval loss (best {eval_loss[best]:.3f} at step {eval_steps[best]})",
        )
    all_loss = train_loss + eval_loss
    if all_loss and min(all_loss) > 0 and max(all_loss) / min(all_loss) > 5:
        loss_axes.set_yscale("log")  # the first steps (~ln(vocab) = 12) would flatten everything after them
    if not all_loss:
        loss_axes.text(
            0.5,
            0.5,
            "no loss values in log_history",
            ha="center",
            va="center",
            transform=loss_axes.transAxes,
            color="grey",
        )
    else:
        loss_axes.legend(fontsize=8)
    loss_axes.set(title="Loss", xlabel="step", ylabel="cross-entropy per caption token")
    loss_axes.grid(alpha=0.3, which="both")

    if metric_series:
        metric_axes = figure.add_subplot(1, columns, 2)
        for name, (steps, values) in metric_series.items():
            best = max(range(len(values)), key=values.__getitem__)
            label = f"{name} (best {values[best]:.3f} at step {steps[best]})"
            metric_axes.plot(steps, values, "o-", lw=2, ms=4, label=label)
        metric_axes.set(title="Caption metrics (eval)", xlabel="step", ylabel="score")
        metric_axes.set_ylim(bottom=0)
        metric_axes.grid(alpha=0.3)
        metric_axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_sample_grid(
    images: list[Image.Image],
    predictions: list[str],
    references: list[list[str]],
    path,
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """A grid of images, each with its generated caption (bold) and up to two references (grey) beneath,
    wrapped to the cell's width; very long captions are cut after a few lines with "…"."""
    return _save(sample_grid_figure(images, predictions, references, columns, title), path)


CELL_WIDTH, IMAGE_HEIGHT, LINE_HEIGHT, PAD, MARGIN, FONT_SIZE = 3.2, 2.4, 0.16, 0.12, 0.2, 8.5  # inches, points
_BOLD = {"weight": "bold", "color": "black"}
_REFERENCE = {"weight": "normal", "color": "#555555"}


def sample_grid_figure(images, predictions, references, columns: int = 4, title: str | None = None) -> Figure:
    """The figure `plot_sample_grid` saves (each caption line is a figure text with gid "caption-<index>")."""
    if not (len(images) == len(predictions) == len(references)) or not images:
        raise ValueError(
            f"need the same non-zero number of images, predictions and reference lists; got {len(images)}, "
            f"{len(predictions)} and {len(references)}"
        )
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    text_width = (CELL_WIDTH - PAD) * 72  # points
    cells = [_caption_lines(prediction, refs, text_width) for prediction, refs in zip(predictions, references)]
    text_heights = [
        max(len(lines) for lines in cells[row * columns : (row + 1) * columns]) * LINE_HEIGHT for row in range(rows)
    ]
    title_height = 0.45 if title else 0.0
    width = columns * CELL_WIDTH + 2 * MARGIN
    height = title_height + sum(IMAGE_HEIGHT + text + 2 * PAD for text in text_heights) + 2 * MARGIN
    figure = Figure(figsize=(width, height), dpi=110)
    if title:
        figure.text(0.5, 1 - (MARGIN + 0.2) / height, title, ha="center", va="center", fontsize=12, weight="bold")

    top = height - MARGIN - title_height  # inches from the bottom edge, moving down row by row
    for index, (image, lines) in enumerate(zip(images, cells)):
        row, column = divmod(index, columns)
        if column == 0 and row > 0:
            top -= IMAGE_HEIGHT + text_heights[row - 1] + 2 * PAD
        left = MARGIN + column * CELL_WIDTH + PAD / 2
        axes = figure.add_axes(
            [left / width, (top - PAD - IMAGE_HEIGHT) / height, (CELL_WIDTH - PAD) / width, IMAGE_HEIGHT / height]
        )
        thumbnail = to_rgb(image).copy()
        thumbnail.thumbnail((480, 480))
        axes.imshow(thumbnail)  # aspect "equal": fits inside the box, never stretched
        axes.set_anchor("S")  # sits on its caption, whatever its shape
        axes.set_axis_off()
        axes.set_gid(f"image-{index}")
        y = top - PAD - IMAGE_HEIGHT - 0.06
        for text, style in lines:
            figure.text(
                left / width,
                y / height,
                text,
                va="top",
                ha="left",
                fontsize=FONT_SIZE,
                gid=f"caption-{index}",
                **style,
            )
            y -= LINE_HEIGHT
    return figure


def _caption_lines(prediction: str, references: list[str], width: float) -> list[tuple[str, dict]]:
    """Wrapped lines with their style: the prediction (at most 4 lines), then one or two references (3 each)."""
    lines = [(line, _BOLD) for line in _wrap(prediction or "(empty caption)", width, 4, _BOLD)]
    for reference in list(references)[:2]:
        lines += [(line, _REFERENCE) for line in _wrap("ref: " + reference, width, 3, _REFERENCE)]
    return lines


_MEASURE = RendererAgg(1, 1, 72)  # at 72 dpi a pixel is a point


def _text_width(text: str, style: dict) -> float:
    """Width in points of `text` drawn at FONT_SIZE in `style` (the Agg renderer's own measure)."""
    font = FontProperties(size=FONT_SIZE, weight=style["weight"])
    return _MEASURE.get_text_width_height_descent(text, font, ismath=False)[0] if text else 0.0


def _wrap(text: str, width: float, max_lines: int, style: dict) -> list[str]:
    """Greedy word wrap by measured width (a word wider than a line is split); more than `max_lines` ends in "…"."""

    def fits(line):
        return _text_width(line, style) <= width

    lines, current = [], ""
    for word in text.split():
        if fits(f"{current} {word}".lstrip()):
            current = f"{current} {word}".lstrip()
            continue
        if current:
            lines.append(current)
        while not fits(word):  # split at the longest prefix that fits (binary search; width grows with length)
            low, high = 1, len(word)
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if fits(word[:middle]) else (low, middle - 1)
            lines.append(word[:low])
            word = word[low:]
        current = word
        if len(lines) > max_lines:
            break
    lines = (lines + [current] if current else lines) or [""]
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor="white")
    return path
