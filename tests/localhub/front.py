"""The front server: the endpoint clients see; it resolves revisions, writes commits and fixes olah's answers
(what it does and does not serve: the package docstring)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .gitstore import (
    DEFAULT_USER,
    HEX_REV,
    REPO_TYPES,
    commit_files,
    create_repository,
    entries,
    git,
    read_meta,
    ref_map,
    repo_dir,
    resolve_revision,
    utc_now,
    write_meta,
)


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
                createdAt=utc_now(),
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
