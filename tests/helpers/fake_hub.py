"""A tiny Hugging Face hub on 127.0.0.1, for the online download path without network (HF_ENDPOINT points at it).

It answers the documented endpoints huggingface_hub's snapshot_download uses, with the fields it reads:
- GET  /api/{models|datasets}/{repo}/revision/{rev}       repo info: {"id", "sha", "siblings"}
- GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]  the file listing ({"type", "path", "size", "oid"})
- HEAD /[datasets/]{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
- GET  /[datasets/]{repo}/resolve/{rev}/{file}            the bytes
Anything else is 404 with the hub's X-Error-Code. `requests` records every (method, path) served, so a test can
see which files were downloaded (and that the ones outside allow_patterns never were).
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    def __init__(self, repos: dict[tuple[str, str], dict[str, bytes]]):
        """repos: {("model" | "dataset", "org/name"): {path in repo: bytes}}."""
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the kernel picks a free one, bound
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloaded(self, kind: str, repo: str) -> set[str]:
        """The files of a repository served with GET."""
        prefix = ("/datasets/" if kind == "dataset" else "/") + f"{repo}/resolve/{COMMIT}/"
        return {p[len(prefix):] for m, p in self.requests if m == "GET" and p.startswith(prefix)}

    # ------------------------------------------------------------------ routing
    def _find(self, parts: list[str]) -> tuple[str, str, list[str]] | None:
        """(kind, repo, rest) for a path whose first parts name a known repository."""
        for (kind, repo), _ in self.repos.items():
            n = len(repo.split("/"))
            if "/".join(parts[:n]) == repo:
                return kind, repo, parts[n:]
        return None

    def _serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path))
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) > 2 and parts[1] in ("models", "datasets"):
            found = self._find(parts[2:])
            if found and found[0] == parts[1][:-1]:
                kind, repo, rest = found
                files = self.repos[(kind, repo)]
                if rest[:1] == ["revision"]:
                    return self._json(request, {"id": repo, "sha": COMMIT, "private": False,
                                                "siblings": [{"rfilename": f} for f in sorted(files)]}, body)
                if rest[:1] == ["tree"]:
                    under = "/".join(rest[2:])
                    listing = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                               for f, data in sorted(files.items()) if not under or f.startswith(under + "/")]
                    return self._json(request, listing, body)
        else:
            kind = "dataset" if parts[:1] == ["datasets"] else "model"
            found = self._find(parts[1:] if kind == "dataset" else parts)
            if found and found[0] == kind and found[2][:1] == ["resolve"]:
                _, repo, rest = found
                data = self.repos[(kind, repo)].get("/".join(rest[2:]))
                if data is not None:
                    request.send_response(200)
                    request.send_header("X-Repo-Commit", COMMIT)
                    request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                    request.send_header("Content-Length", str(len(data)))
                    request.send_header("Content-Type", "application/octet-stream")
                    request.end_headers()
                    if body:
                        request.wfile.write(data)
                    return
                return self._missing(request, "EntryNotFound", body)
        return self._missing(request, "RepoNotFound", body)

    @staticmethod
    def _json(request: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        data = json.dumps(value).encode("utf-8")
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    @staticmethod
    def _missing(request: BaseHTTPRequestHandler, code: str, body: bool) -> None:
        data = json.dumps({"error": code}).encode("utf-8")
        request.send_response(404)
        request.send_header("X-Error-Code", code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)
