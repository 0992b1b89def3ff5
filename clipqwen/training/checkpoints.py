"""Checkpoints that survive a crash: a completeness manifest, resuming from the newest complete one,
rotation after the manifest, and the messages for a failed save or a checkpoint of another setup.

Trainer writes `checkpoint-N/` file by file, and `get_last_checkpoint` picks a torn one after a
crash. Here a checkpoint is complete once `checkpoint_complete.json` (each file's size and SHA-256)
is in it, written last and atomically; `last_complete_checkpoint` skips the others.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


logger = logging.get_logger(__name__)

MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
LOW_SPACE_BYTES = 64 * 1024 * 1024  # below this, a failed write is reported as a full disk


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names it and the previous complete one."""


class IncompleteCheckpointError(ValueError):
    """--resume_from_checkpoint names a folder that is not a complete checkpoint."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint written for other parameter shapes; the message names the file and the tensor."""


# ---- completeness manifest ---------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks (manifests, caches, downloaded weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What a manifest records of a file: its size and SHA-256."""
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def file_problem(path: Path, record: dict, verify_hash: bool = True) -> str | None:
    """How `path` differs from its `file_record` (gone, another size, another SHA-256), or None."""
    try:
        if path.stat().st_size != record.get("size"):
            return f"{path.name} has {path.stat().st_size:,} bytes, its manifest says {record.get('size'):,}"
        if verify_hash and sha256_of(path) != record.get("sha256"):
            return f"{path.name} does not match its SHA-256 (changed or corrupted after it was written)"
    except OSError as error:
        return f"{path.name} cannot be read ({error.strerror or error})"
    return None


def _fsync(path: Path, directory: bool = False):
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync directories
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp"))


def mark_complete(folder, step: int | None = None, weights_only: bool = False) -> Path:
    """Write the manifest that makes `folder` a complete checkpoint. Call it after every file is written.
    Every file is fsynced first and the manifest goes in by an atomic rename, so after a crash or power cut
    the manifest exists only if the data it describes is on disk. `weights_only`: the trained weights and the
    trainer state alone (`is_weights_only`), kept for an export, not for training on."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = file_record(path)
    manifest = {"step": step, "files": files, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if weights_only:
        manifest["weights_only"] = True
    partial = folder / f"{MARKER}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, folder / MARKER)
    _fsync(folder, directory=True)
    return folder / MARKER


def is_weights_only(folder) -> bool:
    """`folder` is a complete checkpoint that holds the trained weights without the optimizer state."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("weights_only", False) is True
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_problem(folder, verify_hashes: bool = True, legacy: bool = False) -> str | None:
    """None if `folder` is a complete checkpoint, else why not. Without a manifest a folder is torn, unless
    `legacy` (a folder none of whose checkpoints has a manifest: written by plain Trainer or an older
    clipqwen), where a parseable trainer_state.json (Trainer writes it last) and no empty file must do."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    marker = folder / MARKER
    if not marker.is_file():
        if not legacy:
            return f"it has no {MARKER} (the save did not finish)"
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"it has no {MARKER} and no readable trainer_state.json ({type(error).__name__})"
        empty = [p.name for p in _files(folder) if p.stat().st_size == 0]
        return f"it has no {MARKER} and empty file(s) {empty}" if empty else None
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MARKER} is unreadable ({type(error).__name__})"
    if missing := [name for name in files if not (folder / name).is_file()]:
        return f"{missing[0]} is missing"
    for check_hash in (False, verify_hashes):  # every size first: a torn save shows without reading a byte
        for name, record in files.items():
            if problem := file_problem(folder / name, record, check_hash):
                return problem
    return None


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def last_complete_checkpoint(output_dir, verify_hashes: bool = True, log: bool = True) -> str | None:
    """The newest complete checkpoint in `output_dir` (None if there is none); torn ones are skipped and logged.
    Sizes are checked for every candidate, SHA-256 for the one returned."""
    checkpoints = list_checkpoints(output_dir)
    legacy = not any((folder / MARKER).is_file() for _, folder in checkpoints)
    for _, folder in reversed(checkpoints):
        problem = checkpoint_problem(folder, verify_hashes=verify_hashes, legacy=legacy)
        if problem is None:
            if legacy and log:
                logger.warning(
                    "%s has no %s (written before clipqwen marked complete checkpoints); it looks "
                    "complete and is used.",
                    folder,
                    MARKER,
                )
            return str(folder)
        if log:
            logger.warning("Skipping %s: incomplete checkpoint, %s. Using an older one.", folder, problem)
    return None


def check_resume_checkpoint(folder) -> str:
    """An explicit --resume_from_checkpoint must be complete; IncompleteCheckpointError says why it is not."""
    siblings = list_checkpoints(Path(folder).parent)
    legacy = not any((f / MARKER).is_file() for _, f in siblings) and not (Path(folder) / MARKER).is_file()
    problem = checkpoint_problem(folder, legacy=legacy)
    if problem:
        newest = last_complete_checkpoint(Path(folder).parent, log=False)
        raise IncompleteCheckpointError(
            f"--resume_from_checkpoint {folder}: not a complete checkpoint, {problem}."
            + (f" The newest complete one is {newest}." if newest else "")
        )
    return str(folder)


def check_optimizer_state(path, params) -> None:
    """The optimizer state in `path` must match `params` (the optimizer's parameters, in order) in count and shapes,
    before anything is loaded into the optimizer."""
    if not os.path.isfile(path):
        return
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise IncompatibleCheckpointError(
            f"{path} holds the optimizer state of {len(ids)} parameter tensors, the model trains {len(params)}. "
            "Resume with the arguments of that run, or start a new --output_dir."
        )
    for i, param in zip(ids, params):
        for key, value in saved["state"].get(i, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise IncompatibleCheckpointError(
                    f"{path}: the optimizer's {key} of parameter {i} has shape {tuple(value.shape)}, the model's "
                    f"parameter {tuple(param.shape)}. Resume with the arguments of that run, or start a new "
                    "--output_dir."
                )


def rotate_checkpoints(output_dir, save_total_limit: int | None, keep=()) -> list[str]:
    """Like Trainer's rotation, but counting only complete checkpoints, and run after the new one is marked
    complete (Trainer's runs before, so a kill right then could leave no complete checkpoint). Torn folders
    older than the newest complete one are deleted too. Returns what was deleted."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    complete = [f for _, f in checkpoints if (f / MARKER).is_file()]
    if not complete:
        return []
    protected = {Path(p).resolve() for p in keep if p} | {complete[-1].resolve()}
    newest_step = int(_CHECKPOINT_RE.match(complete[-1].name).group(1))
    deleted = []
    surplus = len(complete) - max(save_total_limit, len(protected & {f.resolve() for f in complete}))
    for folder in complete:
        if surplus <= 0:
            break
        if folder.resolve() not in protected:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(str(folder))
            surplus -= 1
    for step, folder in checkpoints:
        if step < newest_step and not (folder / MARKER).is_file() and folder.resolve() not in protected:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(str(folder))
    for folder in deleted:
        logger.info("Deleted checkpoint %s (--save_total_limit %d)", folder, save_total_limit)
    return deleted


def clear_for_save(folder) -> None:
    """Before writing checkpoint-N: a folder left at that path by an interrupted run goes, manifest first, so
    that none of its files can end up in (or make complete) the new checkpoint."""
    folder = Path(folder)
    if folder.exists():
        logger.warning("Removing %s left by an interrupted run before saving it again.", folder)
        (folder / MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report the system's error


def os_errno(error: BaseException) -> int | None:
    """The system error behind a failed write: an OSError's number, or the one a Rust writer puts in its message
    (safetensors: "I/O error: File too large (os error 27)")."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = _OS_ERROR_RE.search(str(error))
    return int(match.group(1)) if match else None


def is_write_failure(error: BaseException) -> bool:
    """An error of the file system, also as safetensors' or torch's writers report it (not OSErrors)."""
    return isinstance(error, OSError) or os_errno(error) is not None or "write failed" in str(error).lower()


def what_to_do(error: BaseException, folder) -> str:
    """What frees a write that failed with `error` in `folder`: space, a size limit, or another disk."""
    number = os_errno(error)
    if number == errno.EFBIG:
        return (
            f"the file is over a file-size limit (`ulimit -f`, or the largest file the file system takes): raise it "
            f"or move {folder} to a file system that takes larger files (and pass its new path as --output_dir)"
        )
    if number in _DISK_FULL_ERRNOS or "write failed" in str(error).lower():
        return (
            f"free some space on that disk, or move {folder} to one with room (and pass its new path as --output_dir)"
        )
    return f"fix that, or move {folder} to another disk (and pass its new path as --output_dir)"


def describe_save_failure(folder, output_dir, error: BaseException) -> str:
    """The message for a failed save: what failed, whether the disk is full, and the intact checkpoint."""
    folder, output_dir = Path(folder), Path(output_dir)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    full = (
        getattr(error, "errno", None) in _DISK_FULL_ERRNOS
        or (free is not None and free < LOW_SPACE_BYTES)
        or "write failed" in str(error).lower()
        or "no space left" in str(error).lower()
    )
    what = f"{type(error).__name__}: {error}".strip()
    previous = last_complete_checkpoint(output_dir, verify_hashes=False, log=False)
    message = (
        f"Saving checkpoint {folder} failed"
        + (" because the disk is full" if full else "")
        + f" ({what})"
        + (f"; {free / 2**20:.0f} MiB free on that disk" if free is not None else "")
        + ". "
    )
    message += "The partial checkpoint was removed. "
    message += (
        f"The previous complete checkpoint, {previous}, is intact: "
        if previous
        else "No complete checkpoint was saved before it. "
    )
    message += (
        "free some space (or lower --save_total_limit, or use another --output_dir), then rerun the same "
        "command" + (" to resume from it." if previous else ".")
    )
    return message


# ---- the arguments a run was made with ---------------------------------------------------------------------
RUN_ARGUMENTS = "run_arguments.json"  # what the checkpoints and the export of this folder were trained with


def save_run_arguments(output_dir, arguments: dict[str, object]) -> None:
    """`arguments` ({"--flag": value}) into the output folder, atomically: a rerun compares them with its own."""
    path = Path(output_dir) / RUN_ARGUMENTS
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(arguments, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(partial, path)


def changed_run_arguments(output_dir, arguments: dict[str, object]) -> dict[str, tuple] | None:
    """{"--flag": (saved, given)} for every flag whose value differs from the one the folder's run was made with
    (flags one side lacks are left out: an older run, or a flag added since); None when no run saved any."""
    path = Path(output_dir) / RUN_ARGUMENTS
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    given = json.loads(json.dumps(arguments, default=str))  # compared as saved: tuples as lists, paths as strings
    return {flag: (saved[flag], value) for flag, value in given.items() if flag in saved and saved[flag] != value}
