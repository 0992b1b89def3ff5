"""Checks that run before the first training step, so that a bad value fails in seconds, naming the
flag: the JSON argument file, argument ranges (alone, then against the model's context), a writable
output folder with room for a checkpoint and the export, and one run at a time per folder."""

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import get_args, get_type_hints


# Generous for a 0.6B captioner; beyond them a typo is likelier than intent (docs/reliability.md).
MAX_NUM_BEAMS = 64
MAX_NEW_TOKENS = 512


class PreflightError(ValueError):
    """A value or a folder that would fail the run later; the message names the flag and what to do."""


def read_argument_file(path: str, parser) -> dict:
    """The arguments of a JSON file for `parser` (an HfArgumentParser), refused in one sentence when
    unusable: unreadable, not JSON, not one object, unknown names, or null where None is invalid."""
    try:
        values = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the path of a JSON file of arguments.") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror}).") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not valid UTF-8 ({error.reason} at byte {error.start}); re-save it as UTF-8."
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}, column {error.colno}).") from None
    if not isinstance(values, dict):
        kind = "a JSON array" if isinstance(values, list) else f"the JSON value {json.dumps(values)[:40]}"
        raise ValueError(
            f"{path}: holds {kind}; it must hold one JSON object of arguments, "
            '{"output_dir": "...", "do_train": true, ...}.'
        )
    hints = {name: hint for kind in parser.dataclass_types for name, hint in get_type_hints(kind).items()}
    fields = {f.name for kind in parser.dataclass_types for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown argument(s) {unknown}; see run_captioning.py --help.")
    # null would reach the code as None where a number or flag is expected, far from the file
    nulls = sorted(
        name for name, value in values.items() if value is None and type(None) not in get_args(hints.get(name))
    )
    if nulls:
        raise ValueError(
            f"{path}: {', '.join(nulls)} cannot be null; give a value, or leave the field out for its default."
        )
    return values


def check_arguments(data_args, caption_args, training_args) -> None:
    positive = {
        "--per_device_train_batch_size": training_args.per_device_train_batch_size,
        "--per_device_eval_batch_size": training_args.per_device_eval_batch_size,
        "--gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "--max_train_samples": data_args.max_train_samples,
        "--max_eval_samples": data_args.max_eval_samples,
        "--max_predict_samples": data_args.max_predict_samples,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise PreflightError(f"{flag} {value}: use a number >= 1.")
    if not 1 <= caption_args.num_beams <= MAX_NUM_BEAMS:
        raise PreflightError(f"--num_beams {caption_args.num_beams}: use 1 to {MAX_NUM_BEAMS}.")
    if not 1 <= caption_args.max_new_tokens <= MAX_NEW_TOKENS:
        raise PreflightError(f"--max_new_tokens {caption_args.max_new_tokens}: use 1 to {MAX_NEW_TOKENS}.")
    if training_args.learning_rate <= 0 and training_args.do_train:
        raise PreflightError(f"--learning_rate {training_args.learning_rate}: use a positive value.")


def check_against_model(data_args, caption_args, config, prompt_tokens: int) -> None:
    """Image placeholders + prompt + the longest caption (training) or generation must fit the decoder's context."""
    context = config.text_config.max_position_embeddings
    fixed = config.num_image_tokens + prompt_tokens
    for flag, length in (
        ("--max_caption_length", data_args.max_caption_length),
        ("--max_new_tokens", caption_args.max_new_tokens),
    ):
        if fixed + length > context:
            raise PreflightError(
                f"{flag} {length}: with {config.num_image_tokens} image token(s) and a "
                f"{prompt_tokens}-token prompt it exceeds the decoder's {context} positions; use at "
                f"most {context - fixed}."
            )


def needed_bytes(model) -> int:
    """Room for one checkpoint (trainable weights + two Adam moments) and the export (every weight, once)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return 3 * trainable + every


def check_output_dir(folder, required_bytes: int = 0) -> None:
    """The output folder can be created and written, and its disk has room for what the run will write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"--output_dir {folder} is a file; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PreflightError(
            f"--output_dir {folder} is not writable ({error.strerror or error}); choose another folder."
        ) from error
    free = shutil.disk_usage(folder).free
    if free < required_bytes:
        raise PreflightError(
            f"--output_dir {folder}: {free / 2**20:.0f} MiB free, the run needs about "
            f"{required_bytes / 2**20:.0f} MiB for a checkpoint and the exported model. Free some "
            "space or choose another folder."
        )


class OutputFolderLock:
    """One run at a time per output folder: two runs on one folder would delete each other's checkpoints. An
    advisory lock (flock) that the kernel drops when the process dies, so a crash never leaves a stale lock."""

    def __init__(self, folder):
        self.path = Path(folder) / ".clipqwen.lock"
        self.file = None

    def __enter__(self):
        import fcntl  # POSIX only: imported here so the caption CLI can import the bounds anywhere

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise PreflightError(
                f"--output_dir {self.path.parent} is in use by another run ({holder}). Wait for it, "
                "or choose another --output_dir."
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing the file releases the lock
