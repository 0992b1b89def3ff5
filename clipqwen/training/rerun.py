"""What a run starts from when its output folder holds one: the newest complete checkpoint, or a
finished run to evaluate and export again (or train on, for longer). The flags that define what a
run trained are saved with it (`run_arguments.json`); a rerun that changed any is refused."""

import dataclasses
import json
from pathlib import Path

from transformers.utils import logging

from ..publishing.export import RUN_COMPLETE
from . import checkpoints, preflight


logger = logging.get_logger(__name__)


# Flags a rerun may change without changing what was trained: caches, decoding workers, evaluation and export.
RERUN_MAY_CHANGE = {
    "cache_dir",
    "merge_lora",
    "validation_file",
    "test_file",
    "validation_dir",
    "test_dir",
    "max_eval_samples",
    "max_predict_samples",
    "use_feature_cache",
    "feature_cache_dir",
    "check_images",
    "preprocessing_num_workers",
    "num_beams",
    "max_new_tokens",
    "overwrite_output_dir",
}
TRAINING_FLAGS = (
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "max_steps",
    "num_train_epochs",
)


def starting_point(out: Path, model_args, data_args, caption_args, training_args):
    """(model_args, the checkpoint to resume from or None, the finished run's run_complete.json or
    None), decided before anything loads. A finished run in `out` is not trained again: the returned
    model_args load it from `out`, and do_train is turned off."""
    longer = check_rerun(out, model_args, data_args, caption_args, training_args)
    last_checkpoint, finished = detect_last_checkpoint(out, caption_args, training_args, continue_training=longer)
    if training_args.do_train and training_args.should_save and not finished:
        checkpoints.save_run_arguments(out, run_arguments(model_args, data_args, caption_args, training_args))
    if finished:
        model_args = dataclasses.replace(model_args, model_name_or_path=str(out), model_revision=None, lora_r=0)
        training_args.do_train = False
    return model_args, last_checkpoint, finished


def run_arguments(model_args, data_args, caption_args, training_args) -> dict:
    """{"--flag": value} of what a run trains: every model, data and captioning flag (a flag added later counts
    too) but RERUN_MAY_CHANGE, and TRAINING_FLAGS."""
    values = {
        f.name: getattr(args, f.name)
        for args in (model_args, data_args, caption_args)
        for f in dataclasses.fields(args)
        if f.name not in RERUN_MAY_CHANGE
    }
    values |= {name: getattr(training_args, name) for name in TRAINING_FLAGS}
    return {f"--{name}": value for name, value in values.items()}


def check_rerun(out: Path, model_args, data_args, caption_args, training_args) -> bool:
    """Compare a training rerun into `out` with the flags its run saved. True when the only change
    asks for a longer run (a larger --max_steps, or --num_train_epochs without it); any other change
    is refused, naming each flag: the old checkpoints would pass for ones of the new flags."""
    if not training_args.do_train or caption_args.overwrite_output_dir or training_args.resume_from_checkpoint:
        return False
    arguments = run_arguments(model_args, data_args, caption_args, training_args)
    changed = checkpoints.changed_run_arguments(out, arguments) or {}
    steps = changed.pop("--max_steps", (training_args.max_steps,) * 2)
    epochs = changed.pop("--num_train_epochs", (training_args.num_train_epochs,) * 2)
    if steps[0] > 0 and steps[1] > 0:  # --max_steps wins over --num_train_epochs
        length = {"--max_steps": steps}
    elif steps[0] <= 0 and steps[1] <= 0:
        length = {"--num_train_epochs": epochs}
    else:
        length = {"--max_steps": steps, "--num_train_epochs": epochs}
    length = {flag: values for flag, values in length.items() if values[0] != values[1]}
    longer = len(length) == 1 and all(new > old for old, new in length.values())
    if not longer:
        changed |= length
    if changed:
        listed = "; ".join(f"{flag} {json.dumps(old)} → {json.dumps(new)}" for flag, (old, new) in changed.items())
        raise preflight.PreflightError(
            f"{out} holds a run made with other settings ({listed}); its checkpoints and model are of those. Pass "
            "--overwrite_output_dir to train the new settings there from scratch, or choose another --output_dir "
            "(a longer --max_steps or --num_train_epochs alone continues the run)."
        )
    return longer


def detect_last_checkpoint(
    out: Path, caption_args, training_args, continue_training: bool = False
) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from or None, the finished run's run_complete.json or None). A finished run is
    evaluated and exported again, or, with `continue_training` (check_rerun), resumed from its last checkpoint."""
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "false"):  # `--resume_from_checkpoint True`: the newest one
        resume = training_args.resume_from_checkpoint = None
    if resume is not None:
        if training_args.do_train:  # a torn folder is refused, naming what is wrong and what is complete
            checkpoints.check_resume_checkpoint(resume)
        return resume, None
    if not (out.is_dir() and training_args.do_train and not caption_args.overwrite_output_dir):
        return None, None
    if (out / RUN_COMPLETE).is_file():
        finished = json.loads((out / RUN_COMPLETE).read_text())
        if continue_training:
            last_checkpoint = checkpoints.last_complete_checkpoint(out)
            if last_checkpoint is None:
                raise preflight.PreflightError(
                    f"{out} holds a finished run (step {finished['global_step']}) that kept no checkpoint to train "
                    "on from (--save_strategy no). Pass --overwrite_output_dir to train the longer run from scratch, "
                    "or choose another --output_dir."
                )
            logger.info("Training the finished run further, as asked, from %s.", last_checkpoint)
            return last_checkpoint, None
        logger.warning(
            "%s holds a finished run (step %s): evaluating and exporting it without training. Pass "
            "--overwrite_output_dir to train afresh.",
            out,
            finished["global_step"],
        )
        return None, finished
    # Not transformers' get_last_checkpoint: that takes the highest checkpoint-N, torn or not.
    last_checkpoint = checkpoints.last_complete_checkpoint(out)
    if last_checkpoint is None and (out / "config.json").exists():
        raise ValueError(
            f"{out} already holds a model (config.json) from an earlier run, and no checkpoint-* to "
            "resume. Choose another --output_dir, or pass --overwrite_output_dir to train into it "
            "anyway."
        )
    if last_checkpoint:
        logger.info("Resuming from %s (pass another --output_dir to start afresh).", last_checkpoint)
    return last_checkpoint, None
