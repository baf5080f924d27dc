"""An ASGI app on a real uvicorn server in a thread, on a free loopback port (the review page tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from tests.waiting import eventually
from worker.process.localredis import free_port


@contextmanager
def served(app: ASGIApp) -> Iterator[str]:
    """Yields the server's base URL once it accepts connections; stops it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started or not thread.is_alive(), "the server to start", 20, interval=0.02)
        assert server.started, "the server thread ended before it started"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
