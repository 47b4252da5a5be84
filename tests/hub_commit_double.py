"""TEST DOUBLE, not a Hub: a tiny in-process HTTP server speaking just enough of the Hub's commit API.

No registry package accepts uploads (olah answers 405/404 to create/preupload/commit), so push tests use this
double. It implements what huggingface_hub's ``create_repo`` + ``upload_folder`` + ``snapshot_download`` call:

* ``POST /api/repos/create`` (409 with a JSON ``url`` when the repo exists),
* ``POST /api/validate-yaml`` (parses the card's YAML; 400 with ``errors`` if it does not parse),
* ``POST /api/models/{org}/{name}/preupload/{rev}`` (every file ``regular``: content goes base64 in the commit;
  the LFS/xet path is NOT exercised),
* ``POST /api/models/{org}/{name}/commit/{rev}`` (NDJSON header + file lines),
* ``GET /api/models/{org}/{name}[/revision/{rev}]``, ``GET .../tree/{rev}``,
  ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``).

It records every request (method, path, Authorization header) so tests can check what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


@dataclass
class FakeRepo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None


@dataclass
class CommitApiDouble:
    """State of the double: repos by id and the requests seen."""

    endpoint: str = ""
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    yaml_seen: list[str] = field(default_factory=list)


API_REPO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
API_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$")
API_ACTION = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _etag(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(state: CommitApiDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            return

        def _send(
            self,
            status: int,
            body: object = None,
            headers: dict[str, str] | None = None,
            raw: bytes | None = None,
            head: bool = False,
        ) -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/octet-stream" if raw is not None else "application/json"
            )
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _record(self) -> str:
            path = unquote(urlsplit(self.path).path)
            state.requests.append(Recorded(self.command, path, self.headers.get("Authorization")))
            return path

        def do_POST(self) -> None:
            path = self._record()
            body = self._body()
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            m = API_ACTION.match(path)
            if m and m.group(1) in state.repos:
                repo_id, action, _rev = m.groups()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                return self._commit(repo_id, body)
            self._send(404, {"error": f"test double: no route POST {path}"})

        def _create(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{state.endpoint}/{repo_id}"
            if repo_id in state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            state.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
            self._send(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            content = payload["content"]
            state.yaml_seen.append(content)
            try:
                yaml.safe_load(content.split("---")[1])
            except (yaml.YAMLError, IndexError) as err:
                return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})

        def _commit(self, repo_id: str, body: bytes) -> None:
            repo = state.repos[repo_id]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    repo.messages.append(item["value"]["summary"])
                elif item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    return self._send(400, {"error": f"test double: {item['key']} is not supported"})
            sha = hashlib.sha1(
                json.dumps(sorted((k, _etag(v)) for k, v in repo.files.items())).encode()
            ).hexdigest()
            repo.commits.append(sha)
            self._send(
                200,
                {
                    "commitUrl": f"{state.endpoint}/{repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": None,
                },
            )

        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def _get(self, head: bool) -> None:
            path = self._record()
            for pattern, handler in (
                (API_TREE, self._tree),
                (API_REPO, self._info),
                (RESOLVE, self._resolve),
            ):
                m = pattern.match(path)
                if m and m.group(1) in state.repos and state.repos[m.group(1)].commits:
                    return handler(state.repos[m.group(1)], m, head)
            self._send(
                404,
                {"error": f"test double: no route {self.command} {path}"},
                head=head,
                headers={"X-Error-Code": "RepoNotFound"},
            )

        def _info(self, repo: FakeRepo, m: re.Match, head: bool) -> None:
            siblings = [{"rfilename": p} for p in sorted(repo.files)]
            self._send(
                200,
                {"id": m.group(1), "sha": repo.commits[-1], "private": repo.private, "siblings": siblings},
                head=head,
            )

        def _tree(self, repo: FakeRepo, m: re.Match, head: bool) -> None:
            entries = [
                {"type": "file", "path": p, "size": len(d), "oid": _etag(d)}
                for p, d in sorted(repo.files.items())
            ]
            self._send(200, entries, head=head)

        def _resolve(self, repo: FakeRepo, m: re.Match, head: bool) -> None:
            name = m.group(3)
            if name not in repo.files:
                return self._send(
                    404, {"error": "entry not found"}, head=head, headers={"X-Error-Code": "EntryNotFound"}
                )
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.commits[-1], "ETag": f'"{_etag(data)}"'}
            self._send(200, raw=data, headers=headers, head=head)

    return Handler


@contextmanager
def commit_api_double() -> Iterator[CommitApiDouble]:
    """Run the double on 127.0.0.1 (a free port) in a thread; ``state.endpoint`` is its URL."""
    state = CommitApiDouble()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
