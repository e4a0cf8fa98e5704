"""A Hugging Face Hub-compatible HTTP server on loopback, for tests.

The real `huggingface_hub` and `transformers` clients talk to it through `HF_ENDPOINT`, so pushes and
downloads run the production code paths without reaching huggingface.co. Repositories live in memory.

What it speaks (the subset of the Hub API that `huggingface_hub` 2.x uses to push and pull repos):

- `POST /api/repos/create`, `GET /api/whoami-v2`, `POST /api/validate-yaml`;
- under `/api/{models,datasets,spaces}/{repo_id}`: repo info (optionally at `/revision/{rev}`),
  `/tree/{rev}[/{path}]`, `/paths-info/{rev}`, `/refs`, `/branch/{name}`, `/tag/{rev}`, `/commits/{rev}`,
  `/preupload/{rev}` and the NDJSON `/commit/{rev}`;
- the Git LFS batch API at `/[{type}s/]{repo_id}.git/info/lfs/objects/batch`, with basic and multipart
  transfers and `verify`; transfer URLs stand in for pre-signed storage URLs and need no token;
- `HEAD`/`GET /[{type}s/]{repo_id}/resolve/{rev}/{path}` with `Range`. LFS files are served directly
  (the Hub redirects to a CDN) with the same `X-Linked-Etag`/`X-Linked-Size` headers.

Uploads: `preupload` answers `regular` (the content travels inline in the commit) unless `lfs_threshold`
is set, in which case files at least that large, or matching an LFS pattern of the repo's
`.gitattributes`, go through LFS. A client with `hf_xet` importable uploads LFS files with Xet, which
cannot work offline: use LFS only with `HF_HUB_DISABLE_XET=1` (see `HubServer.client_env`).

Errors are answered as the Hub does: a JSON body and `X-Error-Code`/`X-Error-Message` headers, so the
client raises `RepositoryNotFoundError`, `RevisionNotFoundError`, `EntryNotFoundError`, its 401 error...

`huggingface_hub` reads `HF_ENDPOINT` at import time: run client code in a subprocess, e.g.

    with HubServer() as server:
        out = run_client("from huggingface_hub import whoami; print(whoami()['name'])",
                         server.client_env(tmp_path))
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "alice"
TOKEN = "hf_alice_write"

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.h5", "*.onnx", "*.msgpack", "*.npz", "*.zip")
)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """A file in a commit: its bytes and whether git stores it as an LFS pointer."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def content_oid(self) -> str:
        """The git blob id of the content itself: what a client computes for a `regular` upload."""
        return _git_blob_oid(self.data)

    @property
    def oid(self) -> str:
        """The git blob id of what git stores: the pointer for an LFS file."""
        return _git_blob_oid(self.pointer) if self.lfs else self.content_oid

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.content_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    message: str
    author: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # Uploaded LFS objects by sha256, committed or not: what the LFS batch API deduplicates against.
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        revision = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[oid]

    def history(self, commit: Commit) -> list[Commit]:
        """`commit` and its ancestors, newest first."""
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


class _HubError(Exception):
    """An error answered the way the Hub does: JSON body, `X-Error-Code` and `X-Error-Message` headers."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra
        self.headers = headers or {}


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def _error_response(error: _HubError) -> _Response:
    headers = {"X-Error-Message": error.message, **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _json({"error": error.message, **error.extra}, error.status, headers)


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    remaining: int
    status: int | None  # None: cut the connection instead of answering
    after_bytes: int = 0


@dataclass
class _LfsTicket:
    """An LFS upload in progress; its id in the transfer URLs plays the part of a storage signature."""

    repo: _Repo
    oid: str
    size: int
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int  # 0 when the connection was cut


@dataclass
class _Request:
    query: dict[str, list[str]]
    headers: Any  # the request's `email.message.Message`
    body: bytes
    user: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise _HubError(400, "Invalid JSON body") from None

    def require_user(self) -> str:
        if self.user is None:
            raise _HubError(401, "You must be authenticated to do this")
        return self.user


_API = r"/api/(?P<types>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+|[^/]+)"
_GIT = r"/(?:(?P<types>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+|[^/]+)"
_RESOLVE = _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)"


class HubServer:
    """A Hub-compatible server on `127.0.0.1`, in a thread. Use as a context manager or `start()`/`stop()`.

    `tokens` maps valid tokens to user names; a user may write to repos in its own namespace.
    `lfs_threshold` (bytes) turns LFS uploads on (see the module docstring); LFS objects of at least
    `multipart_threshold` bytes are asked for as multipart uploads in parts of `multipart_chunk_size`.
    The three thresholds are plain attributes and may change while the server runs.
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        *,
        lfs_threshold: int | None = None,
        multipart_threshold: int | None = None,
        multipart_chunk_size: int = 5 * 2**20,
    ):
        self.tokens = dict(tokens) if tokens is not None else {TOKEN: USER}
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._tickets: dict[str, _LfsTicket] = {}
        self._faults: list[_Fault] = []
        self._log: list[LoggedRequest] = []
        self._commit_counter = itertools.count()
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., _Response]]] = [
            (method, re.compile(pattern), handler)
            for method, pattern, handler in [
                ("POST", r"/api/repos/create", self._create_repo),
                ("GET", r"/api/whoami-v2", self._whoami),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("GET", _API, self._repo_info),
                ("GET", _API + r"/revision/(?P<rev>[^/]+)", self._repo_info),
                ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self._tree),
                ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", self._paths_info),
                ("GET", _API + r"/refs", self._refs),
                ("POST", _API + r"/branch/(?P<name>[^/]+)", self._create_branch),
                ("POST", _API + r"/tag/(?P<rev>[^/]+)", self._create_tag),
                ("GET", _API + r"/commits/(?P<rev>[^/]+)", self._list_commits),
                ("POST", _API + r"/preupload/(?P<rev>[^/]+)", self._preupload),
                ("POST", _API + r"/commit/(?P<rev>[^/]+)", self._commit),
                ("GET", _API + r"/xet-(?:read|write)-token/.*", self._no_xet),
                ("POST", _GIT + r"\.git/info/lfs/objects/batch", self._lfs_batch),
                ("GET", _RESOLVE, self._resolve),
                ("HEAD", _RESOLVE, self._resolve),
                ("PUT", r"/_lfs/(?P<ticket>\w+)", self._lfs_put),
                ("PUT", r"/_lfs/(?P<ticket>\w+)/(?P<part>\d+)", self._lfs_put_part),
                ("POST", r"/_lfs/(?P<ticket>\w+)/complete", self._lfs_complete),
                ("POST", r"/_lfs/(?P<ticket>\w+)/verify", self._lfs_verify),
            ]
        ]

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )  # a short poll interval keeps `stop()` quick
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection -------------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` `method` requests whose path matches `path_regex` with `status`."""
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), times, status))

    def drop_next(self, method: str, path_regex: str, after_bytes: int = 1024, times: int = 1) -> None:
        """Cut the connection of the next `times` matching requests after reading `after_bytes` of their body."""
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), times, None, after_bytes))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.remaining > 0 and fault.path.search(path):
                    fault.remaining -= 1
                    return fault
        return None

    # -- introspection ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every request answered so far, in order (the path without its query string)."""
        with self._lock:
            return list(self._log)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The history of `revision`, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return repo.history(repo.resolve(revision))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, StoredFile]:
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].resolve(revision).files)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.files(repo_id, revision, repo_type)[path].data

    # -- client side -----------------------------------------------------------------------------

    def client_env(self, home: str | os.PathLike[str], token: str | None = TOKEN, xet: bool = False) -> dict[str, str]:
        """The environment of a client process that talks to this server, with its cache under `home`.

        `token=None` makes an anonymous client. `xet=False` sets `HF_HUB_DISABLE_XET=1` (plain LFS uploads);
        `xet=True` keeps the default install's behaviour, which works here as long as `lfs_threshold` is None.
        """
        inherited = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")
        env = {key: value for key, value in os.environ.items() if not key.startswith(inherited)}
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(Path(home) / "hf_home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            DISABLE_SAFETENSORS_CONVERSION="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        if token is not None:
            env["HF_TOKEN"] = token
        if not xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    # -- request handling ------------------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Response:
        split = urlsplit(raw_path)
        try:
            user = self._authenticate(headers.get("Authorization"))
            request = _Request(parse_qs(split.query), headers, body, user)
            for route_method, pattern, handler in self._routes:
                match = pattern.fullmatch(split.path)
                if match and route_method == method:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with self._lock:
                        return handler(request, **args)
            raise _HubError(404, f"Not found: {method} {split.path}")
        except _HubError as error:
            return _error_response(error)

    def _authenticate(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, types: str, repo: str, request: _Request, write: bool = False) -> _Repo:
        found = self._repos.get((REPO_TYPES[types], repo))
        # Like the Hub, a private repo is "not found" for anyone but its owner.
        if found is None or (found.private and request.user != found.owner):
            raise _HubError(404, "Repository not found", code="RepoNotFound")
        if write and request.require_user() != found.owner:
            raise _HubError(403, f"You don't have the rights to write to {repo}")
        return found

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _new_commit(
        self, repo: _Repo, branch: str, files: dict[str, StoredFile], title: str, message: str, author: str
    ) -> Commit:
        parent = repo.branches.get(branch)
        tree = sorted((path, stored.oid) for path, stored in files.items())
        seed = json.dumps([repo.repo_id, parent, title, next(self._commit_counter), tree])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title, message, author, _now())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    # -- account and repos -----------------------------------------------------------------------

    def _whoami(self, request: _Request) -> _Response:
        user = request.require_user()
        return _json({
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
        })

    def _create_repo(self, request: _Request) -> _Response:
        user = request.require_user()
        payload = request.json()
        namespace, repo_type = payload.get("organization") or user, payload.get("type") or "model"
        if namespace != user:
            raise _HubError(403, f"You don't have the rights to create a repo under {namespace}")
        if repo_type not in URL_PREFIXES:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            raise _HubError(409, f"You already created this {repo_type} repo", url=url)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = self._repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, user, private)
        gitattributes = StoredFile(INITIAL_GITATTRIBUTES.encode(), lfs=False)
        self._new_commit(repo, "main", {".gitattributes": gitattributes}, "initial commit", "", user)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: _Request) -> _Response:
        content = request.json().get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            return _json({"errors": [{"message": "The YAML metadata block is not closed"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _repo_info(self, request: _Request, types: str, repo: str, rev: str = "main") -> _Response:
        found = self._repo(types, repo, request)
        commit = found.resolve(rev)
        with_blobs = request.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                size = len(stored.data)
                sibling.update(size=size, blobId=stored.oid)
                if stored.lfs:
                    sibling["lfs"] = {"size": size, "sha256": stored.sha256, "pointerSize": len(stored.pointer)}
            siblings.append(sibling)
        return _json({
            "_id": found.repo_id,
            "id": found.repo_id,
            "author": found.owner,
            "sha": commit.oid,
            "createdAt": found.created_at,
            "lastModified": commit.date,
            "private": found.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        })

    # -- tree ------------------------------------------------------------------------------------

    @staticmethod
    def _file_entry(path: str, stored: StoredFile) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": stored.oid, "size": len(stored.data), "path": path}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": len(stored.pointer)}
        return entry

    @staticmethod
    def _folder_entry(path: str, files: dict[str, StoredFile]) -> dict[str, Any]:
        children = sorted((p, f.oid) for p, f in files.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(children).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    @staticmethod
    def _folders(files: dict[str, StoredFile]) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in files for depth in range(1, path.count("/") + 1)}

    def _tree(self, request: _Request, types: str, repo: str, rev: str, path: str = "") -> _Response:
        files = self._repo(types, repo, request).resolve(rev).files
        folders = self._folders(files)
        path = path.strip("/")
        if path and path not in folders:
            raise _HubError(404, f"{path} does not exist on {rev}", code="EntryNotFound")
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = path + "/" if path else ""

        def listed(candidate: str) -> bool:
            return candidate.startswith(prefix) and (recursive or "/" not in candidate[len(prefix) :])

        entries = [self._folder_entry(p, files) for p in sorted(folders) if listed(p)]
        entries += [self._file_entry(p, f) for p, f in sorted(files.items()) if listed(p)]
        return _json(entries)

    def _paths_info(self, request: _Request, types: str, repo: str, rev: str) -> _Response:
        files = self._repo(types, repo, request).resolve(rev).files
        folders = self._folders(files)
        entries = []
        for path in parse_qs(request.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                entries.append(self._file_entry(path, files[path]))
            elif path in folders:
                entries.append(self._folder_entry(path, files))
        return _json(entries)

    # -- refs and history ------------------------------------------------------------------------

    def _refs(self, request: _Request, types: str, repo: str) -> _Response:
        found = self._repo(types, repo, request)

        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]

        return _json({
            "branches": refs(found.branches, "heads"),
            "tags": refs(found.tags, "tags"),
            "converts": [],
            "pullRequests": [],
        })

    def _create_branch(self, request: _Request, types: str, repo: str, name: str) -> _Response:
        found = self._repo(types, repo, request, write=True)
        start = found.resolve(request.json().get("startingPoint") or "main")
        if name in found.branches:
            raise _HubError(409, f"Branch {name} already exists")
        found.branches[name] = start.oid
        return _json({})

    def _create_tag(self, request: _Request, types: str, repo: str, rev: str) -> _Response:
        found = self._repo(types, repo, request, write=True)
        commit, tag = found.resolve(rev), request.json().get("tag")
        if not tag:
            raise _HubError(400, "A tag name is required")
        if tag in found.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        found.tags[tag] = commit.oid
        return _json({})

    def _list_commits(self, request: _Request, types: str, repo: str, rev: str) -> _Response:
        found = self._repo(types, repo, request)
        return _json([
            {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
            for c in found.history(found.resolve(rev))
        ])

    # -- uploads ---------------------------------------------------------------------------------

    @staticmethod
    def _refuse_pull_requests(request: _Request) -> None:
        if request.query.get("create_pr"):
            raise _HubError(400, "Pull requests are not supported by this server")

    def _upload_mode(self, path: str, size: int, files: dict[str, StoredFile]) -> str:
        if self.lfs_threshold is None:
            return "regular"
        gitattributes = files[".gitattributes"].data.decode() if ".gitattributes" in files else ""
        patterns = [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        matches = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
        return "lfs" if size >= self.lfs_threshold or matches else "regular"

    def _preupload(self, request: _Request, types: str, repo: str, rev: str) -> _Response:
        self._refuse_pull_requests(request)
        commit = self._repo(types, repo, request, write=True).resolve(rev)
        answers = []
        for file in request.json().get("files", []):
            mode = self._upload_mode(file["path"], file["size"], commit.files)
            existing = commit.files.get(file["path"])
            # The oid a client computes for this mode: an equal one makes it skip an unchanged file.
            oid = None if existing is None else existing.sha256 if mode == "lfs" else existing.content_oid
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": answers, "commitOid": commit.oid})

    def _commit(self, request: _Request, types: str, repo: str, rev: str) -> _Response:
        self._refuse_pull_requests(request)
        found, branch = self._repo(types, repo, request, write=True), rev.removeprefix("refs/heads/")
        if branch not in found.branches:
            raise _HubError(404, f"Invalid rev id: {rev} is not a branch", code="RevisionNotFound")
        head = found.commits[found.branches[branch]]
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, "Invalid NDJSON body") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not head.oid.startswith(parent):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise _HubError(400, f"Invalid path: {path!r}")
            if key == "file":
                files[path] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = found.lfs_objects.get(value["oid"])
                if data is None:
                    raise _HubError(400, f"LFS pointer to an object that was never uploaded: {path}")
                if hashlib.sha256(data).hexdigest() != value["oid"] or value.get("size", len(data)) != len(data):
                    raise _HubError(400, f"LFS object does not match its oid or size: {path}")
                files[path] = StoredFile(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise _HubError(400, f"Unknown commit operation: {key!r}")
        title, message = header.get("summary", ""), header.get("description", "")
        commit = self._new_commit(found, branch, files, title, message, request.user)
        return _json({
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(found)}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": None,
        })

    def _no_xet(self, request: _Request, **_: str) -> _Response:
        raise _HubError(501, "No Xet storage here: set HF_HUB_DISABLE_XET=1 or lfs_threshold=None")

    # -- Git LFS ---------------------------------------------------------------------------------

    def _lfs_batch(self, request: _Request, repo: str, types: str = "models") -> _Response:
        found = self._repo(types, repo, request, write=True)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise _HubError(400, "Only LFS uploads are supported")
        multipart_from = self.multipart_threshold if "multipart" in payload.get("transfers", ["basic"]) else None
        transfer, objects = "basic", []
        for obj in payload.get("objects", []):
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in found.lfs_objects:
                ticket = secrets.token_hex(16)
                self._tickets[ticket] = _LfsTicket(found, obj["oid"], obj["size"])
                base = f"{self.url}/_lfs/{ticket}"
                upload: dict[str, Any] = {"href": base}
                if multipart_from is not None and obj["size"] >= multipart_from:
                    transfer, chunk_size = "multipart", self.multipart_chunk_size
                    parts = {str(n): f"{base}/{n}" for n in range(1, -(-obj["size"] // chunk_size) + 1)}
                    upload = {"href": f"{base}/complete", "header": {"chunk_size": str(chunk_size), **parts}}
                answer["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify", "header": {}}}
            objects.append(answer)
        batch = {"transfer": transfer, "objects": objects, "hash_algo": "sha256"}
        return _json(batch, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _ticket(self, ticket: str) -> _LfsTicket:
        if ticket not in self._tickets:
            raise _HubError(403, "Unknown or expired upload URL")
        return self._tickets[ticket]

    @staticmethod
    def _store_lfs_object(ticket: _LfsTicket, data: bytes) -> None:
        if len(data) != ticket.size or hashlib.sha256(data).hexdigest() != ticket.oid:
            raise _HubError(400, "The uploaded content does not match the announced oid and size")
        ticket.repo.lfs_objects[ticket.oid] = data

    def _lfs_put(self, request: _Request, ticket: str) -> _Response:
        self._store_lfs_object(self._ticket(ticket), request.body)
        return _Response()

    def _lfs_put_part(self, request: _Request, ticket: str, part: str) -> _Response:
        self._ticket(ticket).parts[int(part)] = request.body
        return _Response(headers={"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'})

    def _lfs_complete(self, request: _Request, ticket: str) -> _Response:
        upload, payload = self._ticket(ticket), request.json()
        parts = payload.get("parts", [])
        if payload.get("oid") != upload.oid or [p["partNumber"] for p in parts] != sorted(upload.parts):
            raise _HubError(400, "The completion does not list the uploaded parts")
        for p in parts:
            if p["etag"].strip('"') != hashlib.md5(upload.parts[p["partNumber"]]).hexdigest():
                raise _HubError(400, f"Wrong etag for part {p['partNumber']}")
        self._store_lfs_object(upload, b"".join(upload.parts[n] for n in sorted(upload.parts)))
        return _json({})

    def _lfs_verify(self, request: _Request, ticket: str) -> _Response:
        request.require_user()
        upload, payload = self._ticket(ticket), request.json()
        stored = upload.repo.lfs_objects.get(payload.get("oid"))
        if stored is None or len(stored) != payload.get("size"):
            raise _HubError(404, "The LFS object was not uploaded")
        return _json({})

    # -- downloads -------------------------------------------------------------------------------

    def _resolve(self, request: _Request, repo: str, rev: str, path: str, types: str = "models") -> _Response:
        commit = self._repo(types, repo, request).resolve(rev)
        stored = commit.files.get(path)
        if stored is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))})
        byte_range = request.headers.get("Range")
        if byte_range is None:
            return _Response(200, stored.data, headers)
        start, end = self._parse_range(byte_range, len(stored.data))
        headers["Content-Range"] = f"bytes {start}-{end}/{len(stored.data)}"
        return _Response(206, stored.data[start : end + 1], headers)

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int]:
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
        if match is None or match.groups() == ("", ""):
            raise _HubError(416, f"Unsupported range: {header}")
        first, last = match.groups()
        if first == "":  # the last `last` bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        if start >= size or start > end:
            raise _HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
        return start, end


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-request is part of what the tests do.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub's clients expect
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        hub = self.server.hub
        path = urlsplit(self.path).path
        fault = hub._take_fault(self.command, path)
        if fault is not None and fault.status is None:
            self._cut(fault.after_bytes)
            status = 0
        else:
            body = self._read_body()
            if fault is not None:
                response = _error_response(_HubError(fault.status, "Injected failure"))
            else:
                response = hub._handle(self.command, self.path, self.headers, body)
            self._send(response)
            status = response.status
        with hub._lock:
            hub._log.append(LoggedRequest(self.command, path, status))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _cut(self, after_bytes: int) -> None:
        self.rfile.read(min(after_bytes, int(self.headers.get("Content-Length") or 0)))
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def run_client(code: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run `code` in a fresh Python process with `env`; return its stdout, failing with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"client exited with {result.returncode}:\n{result.stderr[-6000:]}"
    return result.stdout


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A fresh `HubServer` with one user, `USER`, whose token is `TOKEN`."""
    with HubServer() as server:
        yield server
