"""A chat-completions endpoint on 127.0.0.1 (an ephemeral port) for the judge's tests: each POST to
/v1/chat/completions gets the action that `respond(n, body)` returns for the n-th request (counted from 1), any
other path a 404. An action: {"status": int, "body": json, "headers": {...} (optional), "sleep": seconds (optional)}."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Action = dict[str, Any]


def answer(content: Any) -> Action:
    """A completion whose message is `content`."""
    return {"status": 200, "body": {"choices": [{"message": {"role": "assistant", "content": content}}]}}


def error(status: int, headers: dict[str, str] | None = None) -> Action:
    return {"status": status, "body": {"error": {"message": f"scripted {status}"}}, "headers": headers or {}}


def closed_base_url() -> str:
    """An endpoint URL on 127.0.0.1 where nothing listens (a port just freed): connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


class ChatServer:
    """Started on construction; `requests` records each POST's path, headers and JSON body; `stop()` at teardown."""

    def __init__(self, respond: Callable[[int, dict], Action]) -> None:
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                action = respond(len(server.requests), body) if self.path == "/v1/chat/completions" else error(404)
                time.sleep(action.get("sleep", 0.0))
                payload = json.dumps(action["body"]).encode()
                try:
                    self.send_response(action["status"])
                    for name, value in action.get("headers", {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
