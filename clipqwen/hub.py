"""Everything that talks to the Hugging Face Hub: reachability, revisions to commits, publishing.

One push path per run (run_captioning.py turns Trainer's own pushes off): `prepare_repo`,
`push_checkpoint` for each checkpoint once it is marked complete, then `push_export`. No pickle is
ever uploaded; what each `--hub_strategy` pushes is in docs/training.md.
"""

import argparse
import errno
import re
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id
from transformers.utils import logging


logger = logging.get_logger(__name__)

# files that unpickle when loaded: never uploaded, never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NEVER_UPLOADED = [
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES),
    "*.tmp",
    "*.lock",
    "checkpoint_complete.json",
    "runs/**",
]
REVISION_PLACEHOLDER = "<commit sha>"
USAGE_REVISION = re.compile(r'^(revision = ")[^"\n]*"', re.MULTILINE)  # the model card's usage snippet


def clipqwen_cache_dir() -> Path:
    """$HF_HOME/clipqwen, resolved the way huggingface_hub resolves HF_HOME (XDG_CACHE_HOME included)."""
    return Path(constants.HF_HOME) / "clipqwen"


def is_local(name: str | None) -> bool:
    """A path that exists here; anything else names something on the Hub."""
    return bool(name) and Path(name).expanduser().exists()


def is_hub_id(name: str | None) -> bool:
    """`owner/name` as the Hub spells repository ids, and not a local path: what a model card may
    list and what is worth asking the Hub for (not `./model`, `a/b/c`, `tiny random CLIP` or a bare
    legacy name like `gpt2`)."""
    if not name or "/" not in name or is_local(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---- local file faults --------------------------------------------------------------------------------------
# This machine's file system refusing a write or a read (full, over a size limit, read-only, forbidden): no Hub
# access fixes these, so the Hub-access hints must not follow them.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FORBIDDEN = {errno.EROFS, errno.EACCES, errno.EPERM}
LOCAL_FILE_ERRNOS = _FULL | _FORBIDDEN | {errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}


def local_file_error(error: BaseException | None) -> OSError | None:
    """The local file-system error behind `error` (itself or what it was raised from), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in LOCAL_FILE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def local_file_hint(error: OSError) -> str:
    """What to do about a local file-system error, instead of a Hub-access hint."""
    if error.errno == errno.EFBIG:
        fix = "raise the file-size limit (`ulimit -f`)"
    elif error.errno in _FULL:
        fix = "free some space"
    elif error.errno in _FORBIDDEN:
        fix = "make that folder writable"
    else:
        fix = "check that file and its disk"
    return f"A local file failed, not Hub access: {fix}, or set HF_HOME (the cache) to a folder on another disk."


# ---- reachability -------------------------------------------------------------------------------------------
_PROBES: dict = {}


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None if the Hub endpoint answers (any HTTP status), else why not. One probe per process, no retries,
    through huggingface_hub's own HTTP session (its HTTP library changes between releases)."""
    endpoint = constants.ENDPOINT
    if endpoint not in _PROBES:
        try:
            get_session().head(endpoint, timeout=timeout, follow_redirects=False)
            _PROBES[endpoint] = None
        except Exception as error:  # noqa: BLE001 - whatever the HTTP library raises, the Hub did not answer
            _PROBES[endpoint] = f"{type(error).__name__}: {error}".strip()
    return _PROBES[endpoint]


def hub_out_of_reach(names, timeout: float = 3.0) -> bool:
    """Whether some of `names` must come from the Hub and it does not answer within `timeout` seconds (said in a
    warning). Nothing changes here: the entry point that asked decides, passing `local_files_only=True` (the local
    cache still loads, the rest fails at once instead of after retries for each file, docs/reliability.md)."""
    remote = [name for name in names if name and not is_local(name)]
    if not remote or constants.HF_HUB_OFFLINE:
        return False
    reason = hub_unreachable_reason(timeout)
    if reason is None:
        return False
    logger.warning(
        "The Hugging Face Hub (%s) does not answer (%s): working offline, from the local cache only, for %s.",
        constants.ENDPOINT,
        reason,
        ", ".join(remote),
    )
    return True


def resolve_dataset_revision(name: str, revision: str | None) -> str | None:
    """The commit sha that `revision` (a branch, tag or moving ref like `refs/convert/parquet`)
    names now, so the run loads and records one version of the data. Local folders and offline mode
    keep `revision` as it is."""
    if is_local(name) or constants.HF_HUB_OFFLINE:
        return revision
    sha = HfApi().dataset_info(name, revision=revision).sha
    logger.info(
        "Data set %s at revision %s is commit %s (pass --dataset_revision %s to load exactly this again).",
        name,
        revision or "main",
        sha,
        sha,
    )
    return sha


# ---- publishing ---------------------------------------------------------------------------------------------
def prepare_repo(repo_id: str, *, revision: str | None = None, private: bool | None = None, token=None) -> str:
    """Create the model repository if needed, and the `revision` branch from main if it is missing."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


def push_checkpoint(folder, repo_id: str, strategy: str, *, revision=None, token=None) -> str | None:
    """Upload a complete checkpoint to `last-checkpoint/` (`every_save`, `checkpoint`) or
    `checkpoint-N/` (`all_checkpoints`), nothing for `end`; returns the commit sha."""
    if strategy == "end":
        return None
    folder = Path(folder)
    path_in_repo = folder.name if strategy == "all_checkpoints" else "last-checkpoint"
    commit = HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        revision=revision,
        ignore_patterns=NEVER_UPLOADED,
        commit_message=f"Training in progress, {folder.name}",
    )
    logger.info("Pushed %s to %s/%s (commit %s)", folder.name, repo_id, path_in_repo, commit.oid)
    return commit.oid


def push_export(folder, repo_id: str, *, revision=None, token=None) -> str:
    """Upload the exported folder and return its commit, then pin the card's usage snippet to it in
    a second, card-only commit (a card cannot name the commit that holds it)."""
    folder = Path(folder)
    api = HfApi(token=token)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message="Upload clipqwen captioner",
        ignore_patterns=[*NEVER_UPLOADED, "checkpoint-*", "checkpoint-*/**"],
    )
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8")
    pinned = USAGE_REVISION.sub(rf'\g<1>{commit.oid}"', text)  # the placeholder, or an earlier push's commit
    if pinned != text:
        card.write_text(pinned, encoding="utf-8")
        api.upload_file(
            path_or_fileobj=str(card),
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=revision,
            commit_message=f"Model card: pin the usage snippet to {commit.oid[:10]}",
        )
    logger.info("Pushed %s to %s%s (model commit %s)", folder, repo_id, f"@{revision}" if revision else "", commit.oid)
    return commit.oid


def main(argv=None):
    """`python -m clipqwen.hub FOLDER REPO_ID`: push an exported run again (after a failed push, say)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", help="the exported model folder (run_captioning.py's --output_dir)")
    parser.add_argument("repo_id")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    args = parser.parse_args(argv)
    if not (Path(args.folder) / "config.json").is_file():
        raise SystemExit(f"error: {args.folder} holds no exported model (no config.json).")
    repo_id = prepare_repo(args.repo_id, revision=args.revision, private=args.private or None)
    print(push_export(args.folder, repo_id, revision=args.revision))


if __name__ == "__main__":
    import logging as python_logging  # clipqwen's loggers propagate to Python's root: show their progress here

    python_logging.basicConfig(level=python_logging.INFO)
    main()
