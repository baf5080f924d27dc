"""Our kombu transport against a real Redis: one client object, same unacked bookkeeping as kombu's."""

from __future__ import annotations

import redis
from kombu import Connection

from worker.transport import TRANSPORT, Channel


def test_channel_reuses_one_client_and_acks_clear_the_unacked_records(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as a, channel.conn_or_acquire() as b:
            assert a is b
        explicit = redis.Redis.from_url(redis_url)
        with channel.conn_or_acquire(explicit) as c:
            assert c is explicit

        queue = conn.SimpleQueue("transport-test")
        for i in range(5):
            queue.put({"n": i})
        got = [queue.get(timeout=5) for _ in range(5)]
        raw = redis.Redis.from_url(redis_url)
        assert raw.hlen("unacked") == 5  # delivered, not yet acked: kombu's records, written by our client
        for message in got:
            message.ack()
        assert sorted(m.payload["n"] for m in got) == list(range(5))
        assert raw.hlen("unacked") == 0 and raw.zcard("unacked_index") == 0
        queue.close()
