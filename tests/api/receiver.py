"""A real callback receiver for tests: a threaded HTTP server that checks Standard Webhooks signatures."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    payload: Any  # the verified JSON body, or None when the signature did not verify


@dataclass
class Receiver:
    port: int
    secret: str
    status: int = 204
    location: str | None = None  # with a 3xx status: where it points
    hang_s: float = 0.0  # answer this late (a slow receiver)
    got: list[Delivery] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = Webhook(receiver.secret).verify(body, headers)
                except Exception:
                    payload = None
                receiver.got.append(Delivery(self.path, headers, body, payload))
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def verified(self, path: str = "/hook") -> list[Any]:
        return [d.payload for d in self.got if d.payload is not None and d.path == path]
