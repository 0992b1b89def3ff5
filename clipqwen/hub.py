"""Everything that talks to the Hugging Face Hub: is it reachable, which commit a revision names, and publishing.

One push path for the whole run (run_captioning.py turns Trainer's own pushes off):
- `prepare_repo` creates the repository (private if asked) and the `--hub_revision` branch if it is missing;
- `push_checkpoint` uploads a checkpoint only after it is marked complete (clipqwen.checkpoints), as
  `--hub_strategy` says: `every_save` / `checkpoint` → `last-checkpoint/`, `all_checkpoints` → `checkpoint-N/`,
  `end` → nothing;
- `push_export` uploads the exported model folder, then pins the commit it made in the model card's usage
  snippet with a second commit (a card cannot name the commit that contains it).
No pickle is ever uploaded (`*.bin`, `*.pt`, optimizer and RNG states): checkpoints pushed to the Hub carry the
trainable weights and the trainer state; exact resumption uses the local checkpoint.
"""

import argparse
import os
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


def is_local(name: str | None) -> bool:
    """A path that exists here; anything else names something on the Hub."""
    return bool(name) and Path(name).expanduser().exists()


def is_hub_id(name: str | None) -> bool:
    """`owner/name` as the Hub spells repository ids (huggingface_hub's own check), and not a local path: what a
    model card may list and what is worth asking the Hub for. Anything else (`./model`, `/data/x`, `a/b/c`,
    `tiny random CLIP`, a bare legacy name like `gpt2`, which the Hub redirects to `owner/name`) is not."""
    if not name or "/" not in name or is_local(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


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


def go_offline_if_hub_unreachable(names, timeout: float = 3.0) -> bool:
    """If some of `names` (model or data set ids) must come from the Hub, offline mode is not set and the Hub
    does not answer within `timeout` seconds, switch this process to offline mode (HF_HUB_OFFLINE=1): what is
    in the local cache still loads, and the rest fails at once with a clear message, instead of
    huggingface_hub retrying each file for about 25 seconds. Returns whether it switched."""
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
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    import datasets.config  # here: the caption CLI and the app import this module and never load a data set (1 s)

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return True


def resolve_dataset_revision(name: str, revision: str | None) -> str | None:
    """The commit sha that `revision` (a branch, tag or ref such as `refs/convert/parquet`, which moves when the
    Hub re-converts) names now, so that the run loads and records exactly one version of the data. Local
    folders and offline mode have no revision to resolve."""
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
    """Upload a complete checkpoint as `strategy` says (see the module docstring); returns the commit sha."""
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
    """Upload the exported model folder and return the commit that holds it. Its model card's usage snippet
    (`revision = "<commit sha>"`) is then pinned to that commit, here and on the Hub (a second, card-only
    commit: the weights and code at the pinned commit are the ones described)."""
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
