"""Fixtures of the provenance tests: trust lists written to disk, and a process with no network but Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.provenance.credentials import Chain, make_chain


@pytest.fixture(scope="session")
def trusted_chain() -> Chain:
    return make_chain("Trusted Generator Inc")


@pytest.fixture(scope="session")
def untrusted_chain() -> Chain:
    return make_chain("Unknown Signer Ltd")


@pytest.fixture
def trust_file(tmp_path: Path, trusted_chain: Chain) -> Path:
    path = tmp_path / "trust-anchors.pem"
    path.write_bytes(trusted_chain.root_pem)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Every socket connect in this process raises, except to the test session's Redis; yields attempts."""
    allowed: set[int] = set()
    if "redis_url" in request.fixturenames:
        port = urlparse(request.getfixturevalue("redis_url")).port
        allowed.add(port or 6379)
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def permitted(address: Any) -> bool:
        return isinstance(address, tuple) and len(address) >= 2 and address[1] in allowed

    def connect(self: socket.socket, address: Any) -> None:
        if not permitted(address):
            attempts.append(address)
            raise OSError(f"network access during provenance reading: {address!r}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not permitted(address):
            attempts.append(address)
            raise OSError(f"network access during provenance reading: {address!r}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
