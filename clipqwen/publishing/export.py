"""The folder a run publishes: the complete model (LoRA merged unless --merge_lora False) with its processor,
predictions, figures and a model card from the run's real values. It is staged and moved into place, and
`run_complete.json`, written last, marks the output folder as holding a finished run."""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .. import hub
from ..data.prepare import CaptionData
from ..training import checkpoints
from ..training.timing import PhaseTimer
from .model_card import (
    CardFacts,
    build_model_card,
    describe_data,
    describe_training,
    framework_versions,
    parameter_counts,
)
from .plots import plot_sample_grid, plot_training_curves


RUN_COMPLETE = "run_complete.json"  # written last by export(): the output folder holds a finished run
# The demo sits beside the package in a checkout (not in an installed wheel); the card mentions it only then.
DEMO_APP = Path(__file__).parents[2] / "app.py"


def describe_backbones(args, config) -> tuple[str, str]:
    """Where the vision and text weights came from, for the model card."""
    if args.tiny_model:
        return "tiny random CLIP (test size)", "tiny random Qwen3 (test size)"
    return (
        getattr(config.vision_config, "_name_or_path", "") or args.vision_model_name_or_path,
        getattr(config.text_config, "_name_or_path", "") or args.text_model_name_or_path,
    )


def export(
    trainer,
    processor,
    data: CaptionData,
    predictions: dict[str, list[dict]],
    metrics: dict,
    timer: PhaseTimer,
    *,
    model_args,
    data_args,
) -> Path:
    """The folder that is published: complete model, processor, predictions, figures and model card. The run's
    training arguments and decoding are the trainer's (`trainer.args`, `trainer.generation_kwargs`)."""
    training_args = trainer.args
    final = Path(training_args.output_dir)
    # Written into a staging folder and moved into place at the end: a failure halfway (a full disk) leaves the
    # last checkpoint and no half export, and the same command then resumes and exports again.
    staging = final / f".export-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = save_model(trainer, processor, staging, model_args.merge_lora)
        for split, rows in predictions.items():
            write_jsonl(staging / f"predictions_{split}.jsonl", rows)
        curves = plot_training_curves(trainer.state.log_history, staging / "training_curves.png")
        samples = plot_samples(data, predictions, staging / "sample_captions.png")
        card = model_card(
            trainer,
            model,
            model_args,
            data_args,
            metrics,
            timer,
            curves_png=curves and curves.name,
            samples_png=samples and samples.name,
        )
        card.save(staging / "README.md")
        publish(staging, final, step=trainer.state.global_step)
    except Exception as error:
        if checkpoints.is_write_failure(error) and not isinstance(error, ExportWriteError):
            raise ExportWriteError(failed_file(error, staging), error) from error  # named before the staging goes
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The exported model holds the trained weights now: the copy kept without checkpoints (--save_strategy no) goes.
    kept = Path(trainer._checkpoint_folder())
    if training_args.save_strategy == "no" and checkpoints.is_weights_only(kept):
        shutil.rmtree(kept, ignore_errors=True)
    return final


class ExportWriteError(OSError):
    """Writing the export failed: which file (`path`, relative to the export), and the error."""

    def __init__(self, path: str, error: BaseException):
        self.path, self.error = path, error
        super().__init__(f"writing {path} ({type(error).__name__}: {' '.join(str(error).split())})")


def failed_file(error: BaseException, folder: Path) -> str:
    """The file a failed write was writing: the error's own, else the newest in `folder` (file.write names none;
    the file being written is the last one touched)."""
    path = getattr(error, "filename", None)
    if not path:
        files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
        if not files:  # all moved into place: the run's marker was being written
            return f"a file in {folder if folder.is_dir() else folder.parent}"
        path = max(files, key=lambda p: p.stat().st_mtime_ns)
    path = Path(path)
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def save_model(trainer, processor, folder: Path, merge_lora: bool):
    """The complete model (LoRA merged into it unless --merge_lora False; the LoRA adapter alone in lora/) and the
    processor. Returns the model as saved."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # LoRA
        with weights_file("lora/adapter_model.safetensors"):
            model.save_pretrained(folder / "lora")
        (folder / "lora" / "README.md").unlink(missing_ok=True)  # peft's blank template card (base_model: '')
        if merge_lora:
            model = model.merge_and_unload()
    # The decoding behind the reported scores, so that a bare generate() or the pipeline reproduces them.
    model.generation_config.update(**trainer.generation_kwargs)
    with weights_file("model.safetensors"):
        model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


@contextmanager
def weights_file(name: str):
    """Name `name` in a write failure that safetensors reports: its error names no file, and it removes the partial
    one (the newest file in the folder is then another)."""
    try:
        yield
    except Exception as error:
        if checkpoints.is_write_failure(error) and not isinstance(error, OSError):
            raise ExportWriteError(name, error) from error
        raise


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_samples(data: CaptionData, predictions: dict[str, list[dict]], path, count: int = 8) -> Path | None:
    """The first `count` predicted images of the test split (else validation) with their caption and references.
    Only these images are decoded (a second time with the feature cache); unreadable ones were never predicted."""
    split = "test" if predictions.get("test") else "validation"
    if not predictions.get(split) or split not in data.with_images:
        return None
    by_id = {row["image_id"]: row for row in predictions[split]}
    dataset = data.with_images[split]
    # without its format (the image-decoding transform), reading the ids decodes no image
    indices = [i for i, image_id in enumerate(dataset.with_format(None)["image_id"]) if image_id in by_id][:count]
    if not indices:
        return None
    shown = [(row["image"], by_id[row["image_id"]]) for row in dataset.select(indices) if row["image"] is not None]
    return plot_sample_grid(
        [image for image, _ in shown],
        [row["caption"] for _, row in shown],
        [row["references"] for _, row in shown],
        path,
    )


def model_card(trainer, model, model_args, data_args, metrics, timer, **figures):
    """The model card, from the run's real values."""
    training_args = trainer.args
    vision_id, text_id = describe_backbones(model_args, model.config)
    facts = CardFacts(
        repo_id=training_args.hub_model_id or Path(training_args.output_dir).name,
        vision_id=vision_id,
        text_id=text_id,
        dataset_name="local data" if data_args.local_files else data_args.dataset_name,
        dataset_revision=data_args.dataset_revision if data_args.on_hub else None,
        dataset_detail=describe_data(data_args),
        model_config=model.config,
        metrics=metrics,
        hyperparameters=describe_training(trainer, model_args, data_args),
        generation_config=model.generation_config,  # as saved: the decoding the scores were measured with
        phases=timer.phases,
        versions=framework_versions(),
        **parameter_counts(trainer.model),
        has_demo=DEMO_APP.exists(),
        vision_frozen=model_args.freeze_vision_model,
        language_frozen=model_args.freeze_language_model,
        **figures,
    )
    return build_model_card(facts)


def publish(staging: Path, final: Path, step: int) -> None:
    """Move the staged export into the output folder, config.json last (without it the folder is not a model),
    then mark the run complete."""
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = final / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    marker = final / f"{RUN_COMPLETE}.tmp"
    marker.write_text(json.dumps({"global_step": step}))
    os.replace(marker, final / RUN_COMPLETE)


@contextmanager
def exit_if_export_fails(out: Path):
    """A failed export (a full disk, a file-size limit, a vanished folder) exits in one line naming the file, the
    error and what to do, and where the trained weights are: the same command exports them without training."""
    try:
        yield
    except Exception as error:
        if not checkpoints.is_write_failure(error):
            raise
        cause = error.error if isinstance(error, ExportWriteError) else error
        if isinstance(error, ExportWriteError):
            what = str(error)
        else:  # the run's metrics and state, written into `out` itself
            what = f"writing {failed_file(error, out)} ({type(error).__name__}: {error})"
        checkpoint = checkpoints.last_complete_checkpoint(out, verify_hashes=False, log=False)
        raise SystemExit(
            f"error: exporting to {out} failed {' '.join(what.split())}. "
            + (
                f"The trained weights are saved in {checkpoint}: {checkpoints.what_to_do(cause, out)}, then rerun "
                "the same command to export them without training."
                if checkpoint
                else f"No checkpoint holds trained weights: {checkpoints.what_to_do(cause, out)}, then rerun."
            )
        ) from error


def push_to_hub(folder: Path, repo_id: str, training_args) -> str:
    """Push the exported folder (clipqwen.hub.push_export) and return the commit. A failure (network, permissions,
    quota) exits saying how to push the saved folder again: the run itself is complete."""
    try:
        return hub.push_export(folder, repo_id, revision=training_args.hub_revision, token=training_args.hub_token)
    except Exception as error:  # noqa: BLE001 - whatever went wrong, the folder is complete and can be pushed again
        raise SystemExit(
            f"error: pushing {folder} to {repo_id} failed ({type(error).__name__}: "
            f"{error}). Everything is saved in {folder}; push it again with "
            f"`python -m clipqwen.hub {folder} {repo_id}`."
        ) from error
