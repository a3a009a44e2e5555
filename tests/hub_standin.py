"""A stand-in for the Hugging Face Hub HTTP API, enough for `create_repo` + `upload_folder`.

It speaks the endpoints huggingface_hub 2.4.0 calls for that flow over the plain git/LFS protocol
(no xet: the xet token route answers 404, as a Hub without xet storage would), and records what
arrives so a test can check it:

    with HubStandIn() as hub:
        ...run huggingface_hub with HF_ENDPOINT=hub.url...
        hub.repos["user/model"]          -> {"private": True, "type": "model"}
        hub.files["user/model"]["a.bin"] -> the committed bytes
        hub.auth_headers                 -> every Authorization header received (None when absent)
        hub.unknown                      -> "METHOD /path" of requests it does not implement (answered 404)

`hub.fail(...)` makes it answer an error on demand, e.g. a 403 for one repo or a 500 whose body
echoes the Authorization header (to check that the client scrubs it).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

# Like the Hub's default .gitattributes: weights go through LFS, small text files are committed inline.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends any file this large through LFS

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("GET", re.compile(r"/api/agent-harnesses"), "harnesses"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(rf"/api/models/{_REPO}/xet-write-token/(?P<rev>[^/]+)"), "xet_token"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/verify"), "lfs_verify"),
    ("PUT", re.compile(r"/_lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
]


class HubStandIn:
    """A local Hub on 127.0.0.1 (port chosen by the OS), served from a thread while in `with`."""

    def __init__(self, user: str = "standin-user") -> None:
        self.user = user
        self.url = ""
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}  # repo -> commit summaries, oldest first
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through LFS
        self.auth_headers: list[str | None] = []  # Authorization of every request, in order
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.unknown: list[str] = []  # requests with no route here (answered 404)
        self._failures: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "HubStandIn":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- test controls ---------------------------------------------------------------------------

    def fail(self, status: int, repo_id: str | None = None, route: str | None = None,
             message: str = "refused by the stand-in", echo_auth: bool = False) -> None:
        """Answer `status` to requests about `repo_id` (any repo when None) on `route` (any when None).

        `route` is a name from _ROUTES ("create", "preupload", "commit", ...). With `echo_auth`, the
        error body and X-Error-Message header repeat the request's Authorization header, as a
        careless server might: the client must not pass it on to the user.
        """
        self._failures.append({"status": status, "repo": repo_id, "route": route,
                               "message": message, "echo_auth": echo_auth})

    def _failure_for(self, route: str, repo_id: str | None) -> dict[str, Any] | None:
        for failure in self._failures:
            if failure["route"] in (None, route) and failure["repo"] in (None, repo_id):
                return failure
        return None

    # -- the Hub's answers -----------------------------------------------------------------------

    def answer(self, route: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        """(status, JSON body) for one routed request."""
        repo_id = params.get("repo")
        if route == "create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                else f"{self.user}/{payload['name']}"
        failure = self._failure_for(route, repo_id)
        if failure is not None:
            return failure["status"], failure
        return getattr(self, f"_{route}")(repo_id, params, body)

    def _create(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        payload = json.loads(body)
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            # huggingface_hub 2.x sends "visibility"; older clients send a "private" boolean.
            private = payload.get("visibility") == "private" or payload.get("private") is True
            self.repos[repo_id] = {"private": private, "type": payload.get("type", "model")}
            self.files[repo_id] = {}
            self.commits[repo_id] = []
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _whoami(self, repo_id: None, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, {"type": "user", "name": self.user, "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"role": "write"}}}

    def _harnesses(self, repo_id: None, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def _validate_yaml(self, repo_id: None, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, {"errors": [], "warnings": []}

    def _xet_token(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        # No xet storage here: the route a xet client asks for its write token does not exist.
        return 404, {"error": "Xet storage is not available on this server"}

    def _repo_info(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        return 200, {"id": repo_id, "modelId": repo_id, "private": self.repos[repo_id]["private"],
                     "sha": self._head(repo_id), "siblings": [{"rfilename": p} for p in self.files[repo_id]]}

    def _preupload(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        answers = []
        for item in json.loads(body)["files"]:
            lfs = item["size"] >= LFS_MIN_SIZE or any(fnmatch.fnmatch(item["path"], p) for p in LFS_PATTERNS)
            answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": None})
        return 200, {"files": answers, "commitOid": self._head(repo_id)}

    def _lfs_batch(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"message": "Repository not found"}
        request = json.loads(body)
        objects = []
        for obj in request["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # already stored: no actions, the client skips it
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, repo_id: None, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != params["oid"]:
            return 400, {"error": "content does not match its sha256"}
        with self._lock:
            self.lfs_objects[params["oid"]] = body
        return 200, {}

    def _lfs_verify(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        obj = json.loads(body)
        stored = self.lfs_objects.get(obj["oid"])
        if stored is None or len(stored) != obj["size"]:
            return 404, {"message": f"object {obj['oid']} was not uploaded"}
        return 200, {}

    def _commit(self, repo_id: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            return 400, {"error": "the first line of a commit must be its header"}
        changes: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object for {value['path']} was never uploaded"}
                changes[value["path"]] = self.lfs_objects[value["oid"]]
            else:
                return 400, {"error": f"the stand-in does not support commit key {line['key']!r}"}
        with self._lock:
            self.files[repo_id].update(changes)
            self.commits[repo_id].append(header["value"]["summary"])
            oid = self._head(repo_id)
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                     "pullRequestUrl": None}

    def _head(self, repo_id: str) -> str:
        """A commit id that changes with each commit, like a git sha."""
        return hashlib.sha1(f"{repo_id}:{len(self.commits.get(repo_id, []))}".encode()).hexdigest()


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client pools connections

        def do_GET(self) -> None:
            self._serve()

        do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test reads hub.requests instead

        def _serve(self) -> None:
            body = self._body()
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append(f"{self.command} {path}")
                hub.auth_headers.append(self.headers.get("Authorization"))
            for method, pattern, route in _ROUTES:
                match = pattern.fullmatch(path)
                if method == self.command and match:
                    status, payload = hub.answer(route, {k: v for k, v in match.groupdict().items() if v}, body)
                    break
            else:
                with hub._lock:
                    hub.unknown.append(f"{self.command} {path}")
                status, payload = 404, {"error": f"the stand-in Hub has no route {self.command} {path}"}
            self._reply(status, payload)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                    if size == 0:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload: Any) -> None:
            headers = {"Content-Type": "application/json"}
            if isinstance(payload, dict) and "echo_auth" in payload:  # an injected failure
                message = payload["message"]
                if payload["echo_auth"]:
                    message += f" (request had Authorization: {self.headers.get('Authorization')})"
                headers["X-Error-Message"] = message
                payload = {"error": message}
            data = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
