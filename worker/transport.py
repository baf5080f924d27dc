"""Kombu's Redis transport, minus one client object per message.

Kombu's Redis channel builds a brand-new ``redis.Redis`` client (a few hundred response callbacks copied into
a fresh dict) every time it records a delivery as unacked and every time it acks one: two per event, all
under the GIL, about a tenth of a worker's Python time at a few hundred events/s (py-spy, docs/benchmarks.md).
The client objects are interchangeable: each borrows a connection from the channel's thread-safe pool per
command or pipeline. So this channel builds its synchronous client once and hands that out. Nothing about
delivery changes: the same commands reach Redis in the same order.

Selected by ``broker_transport`` in ``worker.queue.delivery_config``; the broker URL stays ``redis://``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

TRANSPORT = "worker.transport:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel
