"""`LocalHub`: olah and the front server as child processes, started and stopped with the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .gitstore import (
    DEFAULT_USER,
    commit_files,
    create_repository,
    read_meta,
    repo_dir,
    resolve_revision,
    utc_now,
    write_meta,
)


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
                str(Path(__file__).resolve().parent),  # the package folder runs its __main__.py
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
                createdAt=utc_now(),
                base="refs/heads/main",
            )
        ]
        write_meta(gitdir, meta)
