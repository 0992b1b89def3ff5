"""The git layer: bare repositories under ``mirrors/``, revisions resolved to shas, commits made from files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path


REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}  # singular -> URL plural
DEFAULT_USER = "user"  # whoami-v2, author of uploads, namespace of create_repo without organization
META_FILE = "localhub.json"  # inside each bare repo: {"private": bool, "discussions": [...]}
HEX_REV = re.compile(r"[0-9a-f]{7,40}")
NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# The .gitattributes the Hub writes into every new repository (first lines of it). The files this server stores are
# plain git blobs, never LFS pointers, whatever this file says.
HUB_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.safetensors",
        "*.tar",
        "*.tflite",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)


class GitError(RuntimeError):
    pass


def git(gitdir: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> bytes:
    """Run ``git --git-dir=gitdir args`` with a fixed identity and no user/system config; return stdout."""
    full_env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": DEFAULT_USER,
        "GIT_AUTHOR_EMAIL": f"{DEFAULT_USER}@localhub",
        "GIT_COMMITTER_NAME": "localhub",
        "GIT_COMMITTER_EMAIL": "localhub@localhub",
        **(env or {}),
    }
    result = subprocess.run(["git", f"--git-dir={gitdir}", *args], input=input, capture_output=True, env=full_env)
    if result.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def init_bare_repo(gitdir: Path) -> None:
    gitdir.mkdir(parents=True, exist_ok=False)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(gitdir)], check=True, capture_output=True)


def ref_map(gitdir: Path) -> dict[str, str]:
    """Every name a revision may be given by -> commit sha: full ref names, then branch and tag short names."""
    out = git(gitdir, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)")
    full: dict[str, str] = {}
    for line in out.decode().splitlines():
        name, oid, peeled = line.split("\0")
        full[name] = peeled or oid  # annotated tags point at their commit
    names = dict(full)
    for prefix in ("refs/heads/", "refs/tags/"):  # a branch wins over a tag of the same name
        for name, sha in full.items():
            if name.startswith(prefix):
                names.setdefault(name[len(prefix) :], sha)
    return names


def resolve_revision(gitdir: Path, revision: str) -> str | None:
    """Commit sha of a branch, tag, full ref name (``refs/pr/66``) or (short) commit sha; None if unknown."""
    sha = ref_map(gitdir).get(revision)
    if sha is None and HEX_REV.fullmatch(revision):
        try:
            sha = git(gitdir, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").decode().strip()
        except GitError:
            return None
    return sha


def full_ref_name(ref: str) -> str:
    return ref if ref.startswith("refs/") else f"refs/heads/{ref}"


def entries(gitdir: Path, sha: str, paths: list[str]) -> list[tuple[str, str, int] | None]:
    """(oid, type, size) of ``sha:path`` for each path (type "blob" or "tree"), None where it does not exist."""
    if not paths:
        return []
    specs = "".join(f"{sha}:{path}\n" for path in paths).encode()
    out = git(gitdir, "cat-file", "--batch-check", input=specs).decode().splitlines()
    result = []
    for line in out:
        parts = line.split(" ")
        result.append((parts[0], parts[1], int(parts[2])) if len(parts) == 3 and parts[1] != "missing" else None)
    return result


def check_path(path: str) -> str:
    """A repository-relative file path, refused if it could escape the tree or confuse git."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or any(p in ("", ".", "..", ".git") for p in parts)
        or any(c in path for c in "\n\r\0\\")
    ):
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def commit_files(
    gitdir: Path,
    ref: str,
    files: dict[str, bytes | str | Path] | None = None,
    *,
    delete: list[str] = (),
    message: str = "Upload files",
    parent: str | None = "auto",
    replace: bool = False,
    author: str = DEFAULT_USER,
) -> str:
    """Make one git commit on `ref` (a branch name or a full ref such as ``refs/convert/parquet``) and return its sha.

    `files` maps repo paths to contents (bytes, str, or a Path to read). `delete` lists files, or folders ending
    with "/", to remove. The new tree is the parent's tree with those changes, or only `files` if `replace`.
    `parent`: "auto" = the ref's head, or main's head when the ref is new; None = a root commit; or a sha.
    The ref is moved with compare-and-swap: if another writer moved it meanwhile, GitError and nothing changes.
    """
    ref = full_ref_name(ref)
    if subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode != 0:
        raise ValueError(f"invalid ref name {ref!r}")
    refs = ref_map(gitdir)
    old = refs.get(ref)
    if parent == "auto":
        parent = old if old is not None else refs.get("refs/heads/main")
    with tempfile.TemporaryDirectory(prefix="localhub-index-") as tmp:
        env = {
            "GIT_INDEX_FILE": str(Path(tmp) / "index"),
            "GIT_AUTHOR_NAME": author,
            "GIT_AUTHOR_EMAIL": f"{author}@localhub",
        }
        if parent is not None and not replace:
            git(gitdir, "read-tree", parent, env=env)
        else:
            git(gitdir, "read-tree", "--empty", env=env)
        for path in delete:
            listed = git(gitdir, "ls-files", "-z", "--", path, env=env).decode().split("\0")
            listed = [p for p in listed if p and (p == path or (path.endswith("/") and p.startswith(path)))]
            if not listed:
                raise FileNotFoundError(f"A file with this name doesn't exist: {path}")
            removals = "".join(f"0 {'0' * 40}\t{p}\0" for p in listed)  # mode 0 removes (no work tree needed)
            git(gitdir, "update-index", "-z", "--index-info", input=removals.encode(), env=env)
        index_info = []
        for path, content in (files or {}).items():
            check_path(path)
            if isinstance(content, Path):
                content = content.read_bytes()
            elif isinstance(content, str):
                content = content.encode()
            oid = git(gitdir, "hash-object", "-w", "--stdin", input=content).decode().strip()
            index_info.append(f"100644 {oid}\t{path}\0")
        if index_info:
            git(gitdir, "update-index", "-z", "--index-info", input="".join(index_info).encode(), env=env)
        tree = git(gitdir, "write-tree", env=env).decode().strip()
    args = ["commit-tree", tree, "-F", "-"] + (["-p", parent] if parent is not None else [])
    sha = git(gitdir, *args, input=message.encode(), env=env).decode().strip()
    git(gitdir, "update-ref", ref, sha, old or "0" * 40)
    return sha


def read_meta(gitdir: Path) -> dict:
    try:
        return json.loads((gitdir / META_FILE).read_text())
    except FileNotFoundError:
        return {"private": False, "discussions": []}


def write_meta(gitdir: Path, meta: dict) -> None:
    partial = gitdir / f"{META_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    partial.write_text(json.dumps(meta, indent=1))
    partial.replace(gitdir / META_FILE)


def create_repository(mirrors: Path, repo_type: str, repo_id: str, *, private: bool = False) -> Path:
    """A new bare repository with the Hub's initial commit (a .gitattributes on main); FileExistsError if present."""
    gitdir = repo_dir(mirrors, repo_type, repo_id)
    init_bare_repo(gitdir)
    write_meta(gitdir, {"private": bool(private), "discussions": []})
    commit_files(gitdir, "main", {".gitattributes": HUB_GITATTRIBUTES}, message="initial commit", parent=None)
    return gitdir


def repo_dir(mirrors: Path, repo_type: str, repo_id: str) -> Path:
    repo_type = REPO_TYPES.get(repo_type, repo_type)
    if repo_type not in REPO_TYPES.values():
        raise ValueError(f"unknown repo type {repo_type!r}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(NAME_PART.fullmatch(p) and ".." not in p for p in parts):
        raise ValueError(f"repo id must be '<org>/<name>', got {repo_id!r}")
    return Path(mirrors) / repo_type / parts[0] / parts[1]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
