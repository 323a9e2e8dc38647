"""A reward server for tests of reward_model_type api: the standard library's http.server in a thread on 127.0.0.1
(port 0: the system picks a free one), answering LLaMA-Factory's request as LLaMA-Factory's PPO reads the reply.

    with ScoringServer() as server:          # scores each message by length_score: hand-computable
        recipe reward_model: server.url
        server.posts                         # the JSON bodies received, in order
        server.gets                          # GET requests (train's check that the server answers)
    ScoringServer(reply=lambda messages: (500, b"boom"))   # any status and body
    ScoringServer(sender=sending_rank)       # each post also says its "sender": the launcher's RANK that sent it

Usable by any test: `from tests.helpers.reward_server import ScoringServer, length_score`.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

Reply = Callable[[list[str]], tuple[int, bytes]]
Address = tuple[str, int]


def length_score(text: str) -> float:
    """The test server's score of a message: its length in characters / 100."""
    return len(text) / 100


def scores_by_length(messages: list[str]) -> tuple[int, bytes]:
    return 200, json.dumps({"scores": [length_score(m) for m in messages]}).encode()


def sending_rank(client: Address) -> int | None:
    """The RANK (the launcher's environment variable) of the process on this machine whose TCP connection comes from
    `client`, read while it waits for the reply (its connection open); None when none is found."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid and conn.laddr and (conn.laddr.ip, conn.laddr.port) == tuple(client[:2]):
            rank = psutil.Process(conn.pid).environ().get("RANK")
            return None if rank is None else int(rank)
    return None


class ScoringServer:
    """An HTTP server on 127.0.0.1 in a daemon thread; `reply(messages) -> (status, body)` answers each POST;
    `sender(client address)`, when given, tells who sent each POST (its post's "sender")."""

    def __init__(self, reply: Reply = scores_by_length, path: str = "/score",
                 sender: Callable[[Address], Any] | None = None):
        self.posts: list[Any] = []
        self.gets: list[str] = []
        self.reply = reply
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                post = {"path": self.path, "content_type": self.headers["Content-Type"], "body": body}
                if sender is not None:  # while the client waits: its connection is open
                    post["sender"] = sender(self.client_address)
                owner.posts.append(post)
                status, data = owner.reply(body["messages"])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - a POST-only route, as most scoring servers: 405
                owner.gets.append(self.path)
                self.send_error(405)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        # a short poll: shutdown() waits for it (the default 0.5 s, once per test)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "ScoringServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """The URL of a port on 127.0.0.1 that refuses connections while the block runs: bound and held, never listened
    on (Linux refuses a connection to it), so no other process can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/score"
