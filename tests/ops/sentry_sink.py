"""A tiny Sentry ingestion endpoint: real HTTP, envelopes decoded and kept for assertions.

sentry-sdk posts envelopes to ``/api/<project>/envelope/`` (gzip or brotli compressed). An envelope is a JSON
header line followed by items, each a JSON header line and a payload (``length`` bytes, or up to the next
newline). We keep the parsed items so tests can count events and read their breadcrumbs.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Envelope:
    header: dict[str, Any]
    items: list[tuple[dict[str, Any], Any]]


@dataclass
class SentrySink:
    url: str
    envelopes: list[Envelope] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dsn(self, project: int = 1) -> str:
        host = self.url.removeprefix("http://")
        return f"http://publickey@{host}/{project}"

    def events(self) -> list[dict[str, Any]]:
        """Payloads of ``event`` items (errors and crashes), in arrival order."""
        with self.lock:
            return [p for env in self.envelopes for h, p in env.items if h.get("type") == "event"]


def parse_envelope(body: bytes) -> Envelope:
    header_line, _, rest = body.partition(b"\n")
    items: list[tuple[dict[str, Any], Any]] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length:].removeprefix(b"\n")
        try:
            parsed: Any = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload
        items.append((item_header, parsed))
    return Envelope(json.loads(header_line), items)


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "br":
        import brotli

        return bytes(brotli.decompress(body))
    return body


@contextmanager
def sentry_sink() -> Iterator[SentrySink]:
    sink: SentrySink

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = _decode(body, self.headers.get("Content-Encoding", ""))
            if self.path.rstrip("/").endswith("/envelope"):
                with sink.lock:
                    sink.envelopes.append(parse_envelope(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = SentrySink(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
