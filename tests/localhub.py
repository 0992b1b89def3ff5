"""A local stand-in for the Hugging Face Hub, for tests of the online path (Hub ids, Hub data at a revision, push,
reload by id@sha) with no network.

What it is: two processes on 127.0.0.1 that huggingface_hub, transformers and datasets reach through `HF_ENDPOINT`:

- **olah** (PyPI ``olah``, a self-hosted Hub mirror) in offline mode serves the git repositories under
  ``<root>/mirrors/{models,datasets,spaces}/<org>/<name>`` (bare repos, read per request): file downloads
  (``resolve``), repo info, ``tree``, ``paths-info``, ``commits`` and ``refs``.
- **a front server** (this file, ``python3 tests/localhub.py serve``; stdlib ``http.server``), which is the endpoint
  the clients see. It forwards the reads to olah after doing what olah cannot:

  * revisions are resolved here, with ``git``, to a commit sha before olah sees them: branch and tag names,
    refs with slashes (``refs/convert/parquet``, ``refs/pr/66``) URL-encoded or not, short or full shas, in
    ``resolve``, ``api/.../revision``, ``tree``, ``paths-info``, ``commits``, ``preupload``, ``commit``;
  * ``model_info`` / ``dataset_info`` without a revision answer for ``main``, and report ``private`` from
    ``<repo>/localhub.json``;
  * errors carry the Hub's ``X-Error-Code``: a missing repo 401 ``RepoNotFound``, a missing revision 404
    ``RevisionNotFound``, a missing file or folder 404 ``EntryNotFound`` (olah answers 401 or 500), so that
    transformers' probing of optional files behaves as on the Hub;
  * ``Range`` requests on files are answered 206 with the requested bytes (olah sends the whole file);
  * olah's answers are fixed where clients trip on them: ``commits`` (authors as ``{"user": ...}``, title and
    message split), ``tree?expand=true`` (``lastCommit`` from the requested revision; olah fails off main);
  * writes, as huggingface_hub 2.x sends them: ``create_repo`` (``private``, 409 when it exists), ``delete_repo``,
    ``create_branch`` / ``delete_branch``, ``create_tag``, ``preupload`` (every file ``regular``, so contents come
    base64-encoded in the commit, never LFS or Xet), ``commit`` (``create_commit``, ``upload_file``,
    ``upload_folder``, deletions, ``parent_commit``, ``create_pr``): each commit is a real ``git commit`` on the
    named branch (or ``refs/pr/N``) of the server-side repository, answered with ``commitOid`` / ``commitUrl``;
  * pull requests and discussions, kept in ``localhub.json``: listing (transformers looks up the safetensors
    converter bot's PR there), details, creation (a new ``refs/pr/N`` from ``main``);
  * ``whoami-v2`` (user ``user``) and ``validate-yaml`` (YAML front matter parsed with PyYAML when present).

What it does not do: authentication and access control (no token is needed; ``private`` is recorded and reported,
not enforced, so a private repo pushed by a test can be read back without a token), git LFS and Xet uploads,
Spaces runtimes, the dataset viewer / datasets-server (``/parquet`` API), search and listing of repos, merging
PRs, comments, pagination (``tree`` comes in one page; ``commits`` lists the newest 50, olah's cap), repo ids
without a namespace (``gpt2``): ids are ``<org>/<name>``. The front server buffers whole files: fine for tiny repos.

Use::

    with LocalHub(tmp_path / "hub") as hub:
        build_clip_repo(hub); build_qwen_repo(hub); build_flickr30k_repo(hub, n_images=60)
        subprocess.run([sys.executable, "script.py"], env=hub.env(hf_home=tmp_path / "hf"))

``hub.env()`` is the environment a child process needs (``HF_ENDPOINT``, online mode, a fresh ``HF_HOME``, no
token); huggingface_hub reads ``HF_ENDPOINT`` at import, and the test suite's conftest sets offline mode, so the
online code runs in child processes. ``python3 tests/localhub.py up DIR`` builds the three repositories and serves
them until Ctrl-C (for poking with curl). Logs: ``<root>/logs/front.log`` (one line per request) and ``olah.out``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


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


# ----------------------------------------------------------------------------------------------------- git layer


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


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -------------------------------------------------------------------------------------------------- front server


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _repo_not_found() -> HubError:
    return HubError(401, "RepoNotFound", "Repository not found")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


def _entry_not_found(path: str) -> HubError:
    return HubError(404, "EntryNotFound", f"Entry not found: {path}")


_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "range",
    "date",
    "server",
}


class FrontHandler(BaseHTTPRequestHandler):
    """Routes of the Hub API; what olah serves well is forwarded to it with the revision replaced by a sha."""

    protocol_version = "HTTP/1.1"
    server: FrontServer

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ----------------------------------------------------------------------------------------- plumbing

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.log_date_time_string()} {format % args}\n")

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.server.server_address[1]}'}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: list[tuple[str, str]] = (), head_length: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        length = head_length if (self.command == "HEAD" and head_length is not None) else len(body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: list[tuple[str, str]] = ()) -> None:
        self._send(status, json.dumps(obj).encode(), [("Content-Type", "application/json"), *headers])

    def _error(self, err: HubError) -> None:
        headers = [("X-Error-Message", err.message)] + ([("X-Error-Code", err.code)] if err.code else [])
        self._json({"error": err.message}, err.status, headers)

    def _forward(
        self, path: str, body: bytes | None = None, method: str | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request (same method, headers, body unless given) to olah; return status, headers, body."""
        method = method or self.command
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Accept-Encoding"] = "identity"
        conn = http.client.HTTPConnection("127.0.0.1", self.server.olah_port, timeout=300)
        try:
            conn.request(method, path, body=body if body is not None else (self.body or None), headers=headers)
            response = conn.getresponse()
            data = response.read()
            olah = f"127.0.0.1:{self.server.olah_port}"
            out = [
                (k, v.replace(olah, self.endpoint.split("//", 1)[1]) if k.lower() == "location" else v)
                for k, v in response.getheaders()
            ]
            return response.status, out, data
        finally:
            conn.close()

    def _relay(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        self._send(status, data, headers, head_length=length)

    def _dispatch(self) -> None:
        try:
            self.body = self._read_body()  # always, first: an unread body would corrupt the next request
            url = urlsplit(self.path)
            segs = url.path.split("/")[1:]  # raw segments: an encoded "%2F" stays inside its segment
            self.query = parse_qs(url.query)
            self.raw_query = url.query
            if segs and segs[0] == "api":
                self._api(segs[1:])
            else:
                self._file(segs)
        except HubError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # a bug here must show in the client as an error, and in the log with its cause
            traceback.print_exc()
            try:
                self._error(HubError(500, None, f"localhub: {type(err).__name__}: {err}"))
            except OSError:
                pass

    # ------------------------------------------------------------------------------------------- lookup

    def _gitdir(self, type_plural: str, org: str, name: str) -> Path:
        try:
            gitdir = repo_dir(self.server.mirrors, type_plural, f"{unquote(org)}/{unquote(name)}")
        except ValueError:
            raise _repo_not_found() from None
        if not (gitdir / "HEAD").exists():
            raise _repo_not_found()
        return gitdir

    @staticmethod
    def _revision(gitdir: Path, segs: list[str], whole: bool = False) -> tuple[str, str, list[str]]:
        """(name, sha, remaining raw segments) of the revision at the start of `segs`: the longest prefix that
        names a ref (so ``refs/convert/parquet/TEST/x.parquet`` works unencoded), else a commit sha."""
        decoded = [unquote(s) for s in segs]
        if whole:
            name = "/".join(decoded)
            sha = resolve_revision(gitdir, name) if name else None
            if sha is None:
                raise _revision_not_found(name)
            return name, sha, []
        names = ref_map(gitdir)
        for k in range(len(decoded), 0, -1):
            name = "/".join(decoded[:k])
            if name in names:
                return name, names[name], segs[k:]
        if decoded and HEX_REV.fullmatch(decoded[0]):
            sha = resolve_revision(gitdir, decoded[0])
            if sha is not None:
                return decoded[0], sha, segs[1:]
        raise _revision_not_found(decoded[0] if decoded else "")

    # --------------------------------------------------------------------------------------------- files

    def _file(self, segs: list[str]) -> None:
        type_plural, prefix = "models", ""
        if segs and segs[0] in ("datasets", "spaces"):
            type_plural, prefix, segs = segs[0], f"{segs[0]}/", segs[1:]
        if len(segs) < 4 or segs[2] != "resolve" or self.command not in ("GET", "HEAD"):
            self._relay(*self._forward(self.path))
            return
        org, name = segs[0], segs[1]
        gitdir = self._gitdir(type_plural, org, name)
        _, sha, rest = self._revision(gitdir, segs[3:])
        path = unquote("/".join(rest))
        found = entries(gitdir, sha, [path])[0] if path and "\n" not in path else None
        if found is None or found[1] != "blob":
            raise _entry_not_found(path)
        oid, _, size = found
        status, headers, data = self._forward(f"/{prefix}{org}/{name}/resolve/{sha}/{quote(path)}")
        if status != 200:
            self._relay(status, headers, data)
            return
        headers = [(k, v) for k, v in headers if k.lower() not in ("x-repo-commit", "etag", "content-type")]
        headers += [
            ("X-Repo-Commit", sha),
            ("ETag", f'"{oid}"'),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
        ]
        byte_range = self.headers.get("Range")
        if byte_range and self.command == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            start, end = (match.group(1), match.group(2)) if match else ("", "")
            if match and start:
                first, last = int(start), min(int(end) if end else size - 1, size - 1)
            elif match and end:
                first, last = max(size - int(end), 0), size - 1
            else:
                first, last = 0, -1
            if first > last:
                self._send(416, b"", [("Content-Range", f"bytes */{size}")])
                return
            self._send(206, data[first : last + 1], headers + [("Content-Range", f"bytes {first}-{last}/{size}")])
            return
        self._send(200, data, headers, head_length=size)

    # ----------------------------------------------------------------------------------------------- api

    def _api(self, segs: list[str]) -> None:
        if segs == ["whoami-v2"]:
            self._json(
                {
                    "type": "user",
                    "id": "localhub-user",
                    "name": DEFAULT_USER,
                    "fullname": DEFAULT_USER,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
                }
            )
        elif segs == ["validate-yaml"] and self.command == "POST":
            self._validate_yaml()
        elif segs == ["repos", "create"] and self.command == "POST":
            self._create_repo()
        elif segs == ["repos", "delete"] and self.command == "DELETE":
            self._delete_repo()
        elif len(segs) >= 3 and segs[0] in REPO_TYPES.values():
            self._repo_api(segs[0], segs[1], segs[2], segs[3] if len(segs) > 3 else None, segs[4:])
        else:
            self._relay(*self._forward(self.path))

    def _repo_api(self, type_plural: str, org: str, name: str, action: str | None, rest: list[str]) -> None:
        gitdir = self._gitdir(type_plural, org, name)
        base = f"/api/{type_plural}/{org}/{name}"
        query = f"?{self.raw_query}" if self.raw_query else ""
        method = self.command
        if action in (None, "revision") and method in ("GET", "HEAD"):
            sha = self._revision(gitdir, rest, whole=True)[1] if action else self._revision(gitdir, ["main"])[1]
            status, headers, data = self._forward(f"{base}/revision/{sha}{query}")
            if status == 200 and method == "GET":
                info = json.loads(data)
                info["private"] = read_meta(gitdir).get("private", False)
                info.setdefault("xetEnabled", False)
                self._json(info)
            else:
                self._relay(status, headers, data)
        elif action == "tree" and method in ("GET", "HEAD"):
            _, sha, path_segs = self._revision(gitdir, rest)
            path = unquote("/".join(path_segs)).strip("/")
            if path:
                found = entries(gitdir, sha, [path])[0] if "\n" not in path else None
                if found is None or found[1] != "tree":
                    raise _entry_not_found(path)
            expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
            if not expand:
                self._relay(*self._forward(f"{base}/tree/{sha}/{quote(path)}{query}"))
                return
            # olah computes lastCommit from HEAD's history (500 for files off main): ask it without, add it here
            query = "?" + "&".join(p for p in self.raw_query.split("&") if not p.startswith("expand="))
            status, headers, data = self._forward(f"{base}/tree/{sha}/{quote(path)}{query}&expand=false")
            if status != 200 or method == "HEAD":
                self._relay(status, headers, data)
                return
            items = json.loads(data)
            for item in items:
                log = git(gitdir, "log", "-1", "--format=%H%x00%s%x00%ct", sha, "--", item["path"]).decode()
                commit_id, title, timestamp = log.strip().split("\0")
                date = datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
                item["lastCommit"] = {"id": commit_id, "title": title, "date": date}
            self._json(items)
        elif action == "paths-info" and method == "POST":
            sha = self._revision(gitdir, rest, whole=True)[1]
            self._relay(*self._forward(f"{base}/paths-info/{sha}{query}", body=self.body))
        elif action == "commits" and method in ("GET", "HEAD"):
            sha = self._revision(gitdir, rest, whole=True)[1]
            status, headers, data = self._forward(f"{base}/commits/{sha}{query}")
            if status == 200 and method == "GET":  # olah: {"name": ...} authors, the whole message as title
                commits = json.loads(data)
                for commit in commits:
                    title, _, message = commit["title"].partition("\n")
                    authors = [{"user": a.get("name"), "avatar": a.get("avatar")} for a in commit["authors"]]
                    commit.update(title=title, message=message.strip(), authors=authors)
                self._json(commits)
            else:
                self._relay(status, headers, data)
        elif action == "preupload" and method == "POST":
            self._preupload(gitdir, rest)
        elif action == "commit" and method == "POST":
            self._commit(gitdir, type_plural, f"{org}/{name}", rest)
        elif action == "branch" and method in ("POST", "DELETE"):
            self._branch(gitdir, unquote("/".join(rest)))
        elif action == "tag" and method in ("POST", "DELETE"):
            self._tag(gitdir, unquote("/".join(rest)))
        elif action == "discussions":
            self._discussions(gitdir, type_plural, f"{org}/{name}", rest)
        elif action == "settings" and method == "PUT":
            settings = json.loads(self.body or b"{}")
            with self.server.write_lock:
                meta = read_meta(gitdir)
                if "private" in settings or "visibility" in settings:
                    meta["private"] = settings.get("private", settings.get("visibility") == "private")
                write_meta(gitdir, meta)
            self._json({"private": meta["private"]})
        else:
            self._relay(*self._forward(self.path))

    # ------------------------------------------------------------------------------------------ writes

    def _validate_yaml(self) -> None:
        content = json.loads(self.body or b"{}").get("content", "")
        match = re.match(r"\s*---\n(.*?)\n---", content, flags=re.S)
        if match:
            try:
                import yaml
            except ImportError:
                yaml = None
            if yaml is not None:
                try:
                    yaml.safe_load(match.group(1))
                except yaml.YAMLError as err:
                    self._json({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, 400)
                    return
        self._json({"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        prefix = "" if repo_type == "model" else f"{REPO_TYPES[repo_type]}/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        with self.server.write_lock:
            try:
                create_repository(self.server.mirrors, repo_type, repo_id, private=private)
            except FileExistsError:
                self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
                return
            except ValueError as err:
                raise HubError(400, None, str(err)) from None
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        payload = json.loads(self.body or b"{}")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        gitdir = self._gitdir(REPO_TYPES[payload.get("type") or "model"], *repo_id.split("/"))
        with self.server.write_lock:
            shutil.rmtree(gitdir)
        self._json({})

    def _preupload(self, gitdir: Path, rest: list[str]) -> None:
        sha = self._revision(gitdir, rest, whole=True)[1]
        files = json.loads(self.body or b"{}").get("files", [])
        found = entries(gitdir, sha, [f["path"] for f in files if "\n" not in f["path"]])
        existing = dict(zip([f["path"] for f in files if "\n" not in f["path"]], found))
        self._json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": existing[f["path"]][0] if existing.get(f["path"]) else None,
                    }
                    for f in files
                ],
                "commitOid": sha,
            }
        )

    def _commit(self, gitdir: Path, type_plural: str, repo_id: str, rest: list[str]) -> None:
        revision = unquote("/".join(rest))
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        header, files, delete = {}, {}, []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, None, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                delete.append(value["path"].rstrip("/"))
            elif key == "deletedFolder":
                delete.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, None, f"localhub stores regular files only, not {key!r} (LFS/Xet)")
        message = header.get("summary") or "Upload files"
        if header.get("description"):
            message += "\n\n" + header["description"]
        names = ref_map(gitdir)
        ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
        if ref not in names or not ref.startswith(("refs/heads/", "refs/pr/")):
            raise _revision_not_found(revision)
        with self.server.write_lock:
            head = ref_map(gitdir)[ref]
            if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                raise HubError(
                    412,
                    None,
                    f"A commit has happened since. Please refresh and try again "
                    f"(head is {head}, parentCommit {header['parentCommit']})",
                )
            pr_num = None
            if create_pr:
                pr_num = self._new_discussion(
                    gitdir, type_plural, repo_id, message.split("\n")[0], header.get("description", ""), True, base=ref
                )
                ref, head = f"refs/pr/{pr_num}", ref_map(gitdir)[f"refs/pr/{pr_num}"]
            try:
                sha = commit_files(gitdir, ref, files, delete=delete, message=message, parent=head)
            except FileNotFoundError as err:
                raise HubError(404, "EntryNotFound", str(err)) from None
            except ValueError as err:
                raise HubError(400, None, str(err)) from None
        prefix = "" if type_plural == "models" else f"{type_plural}/"
        answer = {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{sha}",
            "hookOutput": "",
        }
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{self.endpoint}/{prefix}{repo_id}/discussions/{pr_num}"
        self._json(answer)

    def _branch(self, gitdir: Path, branch: str) -> None:
        ref = f"refs/heads/{branch}"
        if (
            not branch
            or branch.startswith("refs/")
            or subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode != 0
        ):
            raise HubError(400, None, f"Invalid reference for a branch: {branch}")
        with self.server.write_lock:
            names = ref_map(gitdir)
            if self.command == "DELETE":
                if ref not in names:
                    raise _revision_not_found(branch)
                git(gitdir, "update-ref", "-d", ref)
                self._json({})
                return
            starting_point = json.loads(self.body or b"{}").get("startingPoint") or "main"
            if ref in names:
                self._json({"error": f"Reference already exists: {ref}"}, 409)
                return
            sha = resolve_revision(gitdir, starting_point)
            if sha is None:
                raise _revision_not_found(starting_point)
            git(gitdir, "update-ref", ref, sha, "0" * 40)
        self._json({})

    def _tag(self, gitdir: Path, revision_or_tag: str) -> None:
        with self.server.write_lock:
            if self.command == "DELETE":
                if f"refs/tags/{revision_or_tag}" not in ref_map(gitdir):
                    raise _revision_not_found(revision_or_tag)
                git(gitdir, "update-ref", "-d", f"refs/tags/{revision_or_tag}")
                self._json({})
                return
            payload = json.loads(self.body or b"{}")
            tag = payload.get("tag", "")
            sha = resolve_revision(gitdir, revision_or_tag)
            if sha is None:
                raise _revision_not_found(revision_or_tag)
            if f"refs/tags/{tag}" in ref_map(gitdir):
                self._json({"error": f"Tag already exists: {tag}"}, 409)
                return
            if subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], capture_output=True).returncode:
                raise HubError(400, None, f"Invalid tag name: {tag}")
            if payload.get("message"):
                git(gitdir, "tag", "-a", tag, sha, "-m", payload["message"])
            else:
                git(gitdir, "update-ref", f"refs/tags/{tag}", sha, "0" * 40)
        self._json({})

    # ------------------------------------------------------------------------------------- discussions

    def _new_discussion(
        self,
        gitdir: Path,
        type_plural: str,
        repo_id: str,
        title: str,
        description: str,
        pull_request: bool,
        base: str = "refs/heads/main",
    ) -> int:
        """Record a discussion (and for a PR, create refs/pr/N at `base`'s head); caller holds the write lock."""
        meta = read_meta(gitdir)
        names = ref_map(gitdir)
        used = [d["num"] for d in meta["discussions"]] + [int(n[8:]) for n in names if re.fullmatch(r"refs/pr/\d+", n)]
        num = max(used, default=0) + 1
        if pull_request:
            git(gitdir, "update-ref", f"refs/pr/{num}", names[base], "0" * 40)
        meta["discussions"].append(
            dict(
                num=num,
                title=title,
                description=description,
                author=DEFAULT_USER,
                isPullRequest=pull_request,
                status="open",
                createdAt=_now(),
                base=base,
            )
        )
        write_meta(gitdir, meta)
        return num

    def _discussions(self, gitdir: Path, type_plural: str, repo_id: str, rest: list[str]) -> None:
        singular = {v: k for k, v in REPO_TYPES.items()}[type_plural]

        def public(d: dict) -> dict:
            return {
                "num": d["num"],
                "title": d["title"],
                "status": d["status"],
                "isPullRequest": d["isPullRequest"],
                "createdAt": d["createdAt"],
                "author": {"name": d["author"]},
                "pinned": False,
                "numComments": 1,
                "topReactions": [],
                "repo": {"name": repo_id, "type": singular},
            }

        if not rest and self.command == "POST":
            payload = json.loads(self.body or b"{}")
            with self.server.write_lock:
                num = self._new_discussion(
                    gitdir,
                    type_plural,
                    repo_id,
                    payload.get("title", ""),
                    payload.get("description", ""),
                    bool(payload.get("pullRequest")),
                )
            self._json({"num": num, "url": f"{self.endpoint}/{repo_id}/discussions/{num}"})
        elif not rest and self.command == "GET":
            wanted_type = self.query.get("type", ["all"])[0]
            wanted_status = self.query.get("status", ["all"])[0]
            wanted_author = self.query.get("author", [None])[0]
            found = [
                public(d)
                for d in sorted(read_meta(gitdir)["discussions"], key=lambda d: -d["num"])
                if (wanted_type == "all" or d["isPullRequest"] == (wanted_type == "pull_request"))
                and (wanted_status == "all" or d["status"] == wanted_status)
                and (wanted_author is None or d["author"] == wanted_author)
            ]
            page = int(self.query.get("p", ["0"])[0])
            self._json(
                {
                    "discussions": found if page == 0 else [],
                    "count": len(found),
                    "start": 0 if page == 0 else len(found),
                    "numClosedDiscussions": 0,
                }
            )
        elif len(rest) == 1 and rest[0].isdigit() and self.command == "GET":
            d = next((d for d in read_meta(gitdir)["discussions"] if d["num"] == int(rest[0])), None)
            if d is None:
                raise HubError(404, None, "Discussion not found")
            self._json(
                {
                    **public(d),
                    "events": [],
                    "filesWithConflicts": [],
                    "diff": "",
                    "changes": {"base": d.get("base", "refs/heads/main")},
                }
            )
        else:
            raise HubError(405, None, "localhub: discussion comments, merges and status changes are not served")


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client hung up: normal
            super().handle_error(request, client_address)

    def __init__(self, address, mirrors: Path, olah_port: int):
        super().__init__(address, FrontHandler)
        self.mirrors = Path(mirrors)
        self.olah_port = olah_port
        self.write_lock = threading.Lock()


def _watch_parent(parent_pid: int, olah_pid: int | None) -> None:
    """Stop (olah, then this process) when the process that started us is gone: no orphans after a killed test."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            if olah_pid:
                try:
                    os.kill(olah_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os._exit(0)


def serve(mirrors: Path, olah_port: int, port_file: Path, parent_pid: int | None, olah_pid: int | None) -> None:
    server = FrontServer(("127.0.0.1", 0), mirrors, olah_port)
    partial = port_file.with_suffix(".tmp")
    partial.write_text(str(server.server_address[1]))
    partial.replace(port_file)
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid, olah_pid), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# ----------------------------------------------------------------------------------------------------- LocalHub


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalHub:
    """olah + the front server, as subprocesses serving the bare git repos under ``root/mirrors``.

    ``LocalHub(root)`` starts both (about 2 s; olah's import dominates); ``endpoint`` is the URL for
    ``HF_ENDPOINT``. Repositories may be created before or after the start (olah reads them per request).
    """

    def __init__(self, root: Path | str, *, start: bool = True, timeout: float = 60.0):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.logs = self.root / "logs"
        for folder in (self.mirrors, self.logs, self.root / "olah-cache"):
            folder.mkdir(parents=True, exist_ok=True)
        self.endpoint: str | None = None
        self._olah: subprocess.Popen | None = None
        self._front: subprocess.Popen | None = None
        if start:
            self.start(timeout)

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> LocalHub:
        olah_port = _free_port()
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {olah_port}\n'
            f"repos-path = {json.dumps(str(self.root / 'olah-cache'))}\n"
            f"mirrors-path = [{json.dumps(str(self.mirrors))}]\n"
            "[accessibility]\noffline = true\n"  # else every request is checked upstream (504 after ~36 s)
        )
        self._olah = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(self.logs)],
            stdout=open(self.logs / "olah.out", "ab"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        port_file = self.root / "front.port"
        port_file.unlink(missing_ok=True)
        self._front = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "serve",
                "--mirrors",
                str(self.mirrors),
                "--olah-port",
                str(olah_port),
                "--port-file",
                str(port_file),
                "--parent-pid",
                str(os.getpid()),
                "--olah-pid",
                str(self._olah.pid),
            ],
            stdout=open(self.logs / "front.log", "ab"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and _port_open(olah_port)):  # olah answers 500 on GET /: poll the port
            for proc, log in ((self._olah, "olah.out"), (self._front, "front.log")):
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"localhub: {log} process exited:\n{(self.logs / log).read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"localhub did not start within {timeout} s; see {self.logs}")
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{int(port_file.read_text())}"
        return self

    def stop(self) -> None:
        for proc in (self._front, self._olah):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self._front, self._olah):
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._front = self._olah = None

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, hf_home: Path | str | None = None, **extra: str) -> dict[str, str]:
        """os.environ for a child process that talks to this hub: online, no token, its own HF_HOME."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE")
        }
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if hf_home is not None:
            env["HF_HOME"] = str(hf_home)
        env.update(extra)
        return env

    # ------------------------------------------------------------------------------------- repositories

    def repo_path(self, repo_type: str, repo_id: str) -> Path:
        """The bare git repository of a Hub repo (``repo_type``: model / dataset / space, or the plural)."""
        return repo_dir(self.mirrors, repo_type, repo_id)

    def sha(self, repo_type: str, repo_id: str, ref: str = "main") -> str:
        """Commit sha of a branch, tag or full ref (``refs/convert/parquet``) of a repo; KeyError if unknown."""
        sha = resolve_revision(self.repo_path(repo_type, repo_id), ref)
        if sha is None:
            raise KeyError(f"{repo_type} {repo_id} has no revision {ref!r}")
        return sha

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False, exist_ok: bool = False) -> Path:
        """A new repo as the Hub makes it: main holds one commit with a .gitattributes."""
        try:
            return create_repository(self.mirrors, repo_type, repo_id, private=private)
        except FileExistsError:
            if not exist_ok:
                raise
            return self.repo_path(repo_type, repo_id)

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        ref: str = "main",
        message: str = "Upload files",
        delete: list[str] = (),
        parent: str | None = "auto",
        replace: bool = False,
        author: str = DEFAULT_USER,
    ) -> str:
        """One real git commit on `ref` (branch name or full ref: ``refs/convert/parquet``, ``refs/pr/66``); the
        repo is created if missing. See `commit_files` for `parent` / `replace`. Returns the commit sha."""
        self.create_repo(repo_type, repo_id, exist_ok=True)
        return commit_files(
            self.repo_path(repo_type, repo_id),
            ref,
            files,
            delete=delete,
            message=message,
            parent=parent,
            replace=replace,
            author=author,
        )

    def add_pull_request(
        self, repo_type: str, repo_id: str, num: int, title: str, author: str, status: str = "open"
    ) -> None:
        """Record PR `num` (its ref ``refs/pr/<num>`` made by `commit`) so the discussions API lists it."""
        gitdir = self.repo_path(repo_type, repo_id)
        meta = read_meta(gitdir)
        meta["discussions"] = [d for d in meta["discussions"] if d["num"] != num] + [
            dict(
                num=num,
                title=title,
                description="",
                author=author,
                isPullRequest=True,
                status=status,
                createdAt=_now(),
                base="refs/heads/main",
            )
        ]
        write_meta(gitdir, meta)


# ----------------------------------------------------------------------------- the three repositories of the project

CLIP_ID = "openai/clip-vit-base-patch32"
QWEN_ID = "Qwen/Qwen3-0.6B-Base"
FLICKR_ID = "nlphuji/flickr30k"
SAFETENSORS_PR = 66  # the converter bot's pull request on the real CLIP repo
SAFETENSORS_PR_TITLE = "Adding `safetensors` variant of this model"  # what transformers' auto_conversion looks for

# The real file of openai/clip-vit-base-patch32 (legacy keys: "size"/"crop_size" as ints; transformers reads them as
# shortest_edge 224 / crop 224x224; do_convert_rgb is the class default, True).
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

FLICKR_README = """---
language:
- en
tags:
- image-captioning
pretty_name: Flickr30k
---

# Flickr30k

Stand-in for tests (tests/localhub.py): same layout as the real repository (a loading script on `main`, parquet
files on `refs/convert/parquet`), generated pictures of coloured shapes instead of the Flickr photos.

Original paper: [From image descriptions to visual denotations](https://aclanthology.org/Q14-1006)
"""

FLICKR_SCRIPT = '''"""Flickr30k loading script (stand-in stub: datasets >= 4 no longer runs loading scripts)."""
import datasets

_URL = "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main/"


class Flickr30k(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIGS = [datasets.BuilderConfig(name="TEST", version=datasets.Version("1.1.0"))]

    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({
            "image": datasets.Image(), "caption": [datasets.Value("string")], "sentids": [datasets.Value("string")],
            "split": datasets.Value("string"), "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }))

    def _split_generators(self, dl_manager):
        files = dl_manager.download({"csv": _URL + "flickr_annotations_30k.csv", "zip": _URL + "flickr30k-images.zip"})
        return [datasets.SplitGenerator(name=datasets.Split.TEST, gen_kwargs=files)]

    def _generate_examples(self, csv, zip):
        raise NotImplementedError("stand-in stub")
'''


def _project_on_path() -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def build_clip_repo(hub: LocalHub, repo_id: str = CLIP_ID, seed: int = 0) -> dict[str, str]:
    """A tiny random CLIPModel laid out like the real repo: main has config.json, pytorch_model.bin (no
    safetensors), preprocessor_config.json; ``refs/pr/66`` (the converter bot's open PR, listed by the discussions
    API) adds model.safetensors with the same weights. Returns {"main": sha, "refs/pr/66": sha}."""
    import safetensors.torch
    import torch
    from transformers import CLIPConfig, CLIPModel

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    config = CLIPConfig(
        text_config=dict(tiny, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tiny, image_size=224, patch_size=32),
        projection_dim=32,
    )
    config.architectures = ["CLIPModel"]
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        config_json = Path(tmp, "config.json").read_bytes()
    weights = io.BytesIO()
    torch.save(state_dict, weights)
    hub.create_repo("model", repo_id, exist_ok=True)
    main = hub.commit(
        "model",
        repo_id,
        {
            "README.md": "---\ntags:\n- vision\nwidget: []\n---\n\n# CLIP (tiny random stand-in for tests)\n",
            "config.json": config_json,
            "preprocessor_config.json": json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=2) + "\n",
            "pytorch_model.bin": weights.getvalue(),
        },
        message="Upload tiny random CLIPModel",
    )
    pr_ref = f"refs/pr/{SAFETENSORS_PR}"
    pr = hub.commit(
        "model",
        repo_id,
        {
            "model.safetensors": safetensors.torch.save(state_dict, metadata={"format": "pt"}),
        },
        ref=pr_ref,
        parent=main,
        message=SAFETENSORS_PR_TITLE,
        author="SFconvertbot",
    )
    hub.add_pull_request("model", repo_id, SAFETENSORS_PR, SAFETENSORS_PR_TITLE, author="SFconvertbot")
    return {"main": main, pr_ref: pr}


def qwen_tokenizer_files() -> dict[str, bytes]:
    """The real Qwen3 tokenizer files: the project's bundled tokenizer.json + tokenizer_config.json as shipped,
    and vocab.json / merges.txt derived from tokenizer.json (the slow-tokenizer files the real repo also has)."""
    _project_on_path()
    from clipqwen.tiny import bundled_tokenizer_dir

    folder = bundled_tokenizer_dir()
    tokenizer_json = (folder / "tokenizer.json").read_bytes()
    bpe = json.loads(tokenizer_json)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": (folder / "tokenizer_config.json").read_bytes(),
        "vocab.json": json.dumps(bpe["vocab"], ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
    }


def build_qwen_repo(hub: LocalHub, repo_id: str = QWEN_ID, seed: int = 0) -> str:
    """A tiny random Qwen3ForCausalLM (width 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, the real vocabulary of
    151,936 rows, tied embeddings, bos = eos = 151643) in bfloat16 as model.safetensors, with config.json,
    generation_config.json and the real tokenizer files. Returns the sha of main."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32768,
        max_window_layers=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
        use_sliding_window=False,
        sliding_window=None,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    generation_config = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = {name: Path(tmp, name).read_bytes() for name in ("config.json", "model.safetensors")}
    files["generation_config.json"] = json.dumps(generation_config, indent=2) + "\n"
    files.update(qwen_tokenizer_files())
    files["README.md"] = (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n"
        "# Qwen3-0.6B-Base (tiny random stand-in for tests)\n"
    )
    hub.create_repo("model", repo_id, exist_ok=True)
    return hub.commit("model", repo_id, files, message="Upload tiny random Qwen3ForCausalLM")


def flickr30k_rows(n_images: int = 300, *, image_size: int = 256, seed: int = 0) -> dict[str, list]:
    """Columns of the stand-in Flickr30K in the real schema, from `clipqwen.data.embedded` (learnable shapes):
    80 % train, 10 % val, 10 % test, interleaved; ``image`` holds JPEG bytes."""
    _project_on_path()
    import numpy as np

    from clipqwen.data.embedded import generate_split

    n_val = n_test = max(1, round(n_images * 0.1))
    n_train = n_images - n_val - n_test
    examples = []
    for split, embedded_split, n in (
        ("train", "train", n_train),
        ("val", "validation", n_val),
        ("test", "test", n_test),
    ):
        examples += [(split, e) for e in generate_split(embedded_split, n, seed=seed, image_size=image_size)]
    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    columns: dict[str, list] = {k: [] for k in ("image", "caption", "sentids", "split", "img_id", "filename")}
    for row, index in enumerate(order):
        split, example = examples[index]
        jpeg = io.BytesIO()
        example["image"].save(jpeg, format="JPEG", quality=90)
        columns["image"].append({"bytes": jpeg.getvalue(), "path": None})
        columns["caption"].append(list(example["captions"]))
        columns["sentids"].append([str(5 * row + j) for j in range(5)])
        columns["split"].append(split)
        columns["img_id"].append(str(row))
        columns["filename"].append(f"{1000092795 + 7919 * row}.jpg")
    return columns


def flickr30k_features():
    """nlphuji/flickr30k's parquet schema: image, caption (5), sentids (5), split, img_id, filename."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "sentids": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )


def build_flickr30k_repo(
    hub: LocalHub,
    n_images: int = 300,
    *,
    rows_per_shard: int = 100,
    image_size: int = 256,
    seed: int = 0,
    repo_id: str = FLICKR_ID,
) -> dict[str, str]:
    """The dataset repo: main holds README.md and the loading script flickr30k.py (which datasets >= 4 refuses, as
    with the real repo); ``refs/convert/parquet`` holds ``TEST/test/0000.parquet``, ``0001.parquet``, ... with
    columns image (Image), caption (list of 5), sentids (list of 5), split, img_id, filename and the datasets
    features in the parquet metadata. Returns {"main": sha, "refs/convert/parquet": sha}."""
    import datasets

    features = flickr30k_features()
    columns = flickr30k_rows(n_images, image_size=image_size, seed=seed)
    shards = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shard, start in enumerate(range(0, n_images, rows_per_shard)):
            chunk = {k: v[start : start + rows_per_shard] for k, v in columns.items()}
            path = Path(tmp, f"{shard:04d}.parquet")
            datasets.Dataset.from_dict(chunk, features=features).to_parquet(str(path))
            shards[f"TEST/test/{shard:04d}.parquet"] = path.read_bytes()
    hub.create_repo("dataset", repo_id, exist_ok=True)
    main = hub.commit(
        "dataset",
        repo_id,
        {"README.md": FLICKR_README, "flickr30k.py": FLICKR_SCRIPT},
        message="Add loading script and card",
    )
    parquet = hub.commit(
        "dataset",
        repo_id,
        {".gitattributes": HUB_GITATTRIBUTES, **shards},
        ref="refs/convert/parquet",
        parent=main,
        replace=True,
        message="Update parquet files",
        author="parquet-converter",
    )
    return {"main": main, "refs/convert/parquet": parquet}


def build_all(hub: LocalHub, n_images: int = 300) -> dict[str, dict[str, str]]:
    """The three repositories the project reads from the Hub; returns their shas by repo id and ref."""
    return {
        CLIP_ID: build_clip_repo(hub),
        QWEN_ID: {"main": build_qwen_repo(hub)},
        FLICKR_ID: build_flickr30k_repo(hub, n_images),
    }


# ---------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the front server (LocalHub starts it)")
    p.add_argument("--mirrors", type=Path, required=True)
    p.add_argument("--olah-port", type=int, required=True)
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--olah-pid", type=int)
    p = sub.add_parser("up", help="build the three repositories in DIR and serve them until Ctrl-C")
    p.add_argument("dir", type=Path)
    p.add_argument("--n-images", type=int, default=300)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.mirrors, args.olah_port, args.port_file, args.parent_pid, args.olah_pid)
    else:
        with LocalHub(args.dir) as hub:
            if not any(hub.mirrors.iterdir()):
                print(json.dumps(build_all(hub, args.n_images), indent=1))
            print(f"HF_ENDPOINT={hub.endpoint}  (logs in {hub.logs}; Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
