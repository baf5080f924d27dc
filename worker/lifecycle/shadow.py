"""Shadow-mode statistics: how a candidate model would have decided live traffic, kept in one Redis hash.

Every worker adds to the same ``{ns}:shadow:{version}`` hash with HINCRBY/HINCRBYFLOAT in one pipeline, so
the report is exact across workers and survives their restarts. Score drift keeps a histogram of absolute
score differences (bins of 0.001) rather than the raw values: the hash stays small whatever the traffic and
p95 is still read to three decimals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from worker.records import Decision

BIN = 1000  # histogram bins per unit of |score difference|


@dataclass(frozen=True)
class Comparison:
    """One event decided by ``current`` and scored by the shadow model."""

    live: Decision
    shadow: Decision


def record(
    client: Any, key: str, comparisons: Sequence[Comparison], live_ms: float, shadow_ms: float
) -> None:
    """Add one batch to the shadow hash (one round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(key, "batches", 1)
    pipe.hincrbyfloat(key, "live_ms", live_ms)
    pipe.hincrbyfloat(key, "shadow_ms", shadow_ms)
    for c in comparisons:
        if c.live.ai_score is None or c.shadow.ai_score is None:
            continue
        diff = abs(c.live.ai_score - c.shadow.ai_score)
        pipe.hincrby(key, "events", 1)
        pipe.hincrby(key, "agree", int(c.live.verdict == c.shadow.verdict))
        pipe.hincrbyfloat(key, "sum_abs_diff", diff)
        pipe.hincrby(key, f"d:{min(int(diff * BIN), BIN)}", 1)
        pipe.hincrby(key, f"v:{c.live.verdict.value}>{c.shadow.verdict.value}", 1)
    pipe.execute()


def count_skipped(client: Any, key: str, reason: str, n: int = 1) -> None:
    client.hincrby(key, f"skipped:{reason}", n)


class ShadowReport(BaseModel):
    version: str
    events: int
    batches: int
    agreement: float | None
    mean_abs_diff: float | None
    p95_abs_diff: float | None
    max_abs_diff: float | None
    latency_ratio: float | None  # shadow model time / live model time over the same batches
    verdicts: dict[str, int]  # "live>shadow" -> count
    skipped: dict[str, int]


def report(client: Any, key: str, version: str) -> ShadowReport | None:
    """Read a shadow hash back; ``None`` when nothing was ever recorded for ``version``."""
    raw = client.hgetall(key)
    if not raw:
        return None
    h = {_s(k): _s(v) for k, v in raw.items()}
    events = int(h.get("events", 0))
    live_ms = float(h.get("live_ms", 0.0))
    bins = sorted((int(k[2:]), int(v)) for k, v in h.items() if k.startswith("d:"))
    return ShadowReport(
        version=version,
        events=events,
        batches=int(h.get("batches", 0)),
        agreement=int(h.get("agree", 0)) / events if events else None,
        mean_abs_diff=float(h.get("sum_abs_diff", 0.0)) / events if events else None,
        p95_abs_diff=_quantile(bins, 0.95),
        max_abs_diff=(bins[-1][0] + 1) / BIN if bins else None,
        latency_ratio=float(h.get("shadow_ms", 0.0)) / live_ms if live_ms > 0 else None,
        verdicts={k[2:]: int(v) for k, v in h.items() if k.startswith("v:")},
        skipped={k[8:]: int(v) for k, v in h.items() if k.startswith("skipped:")},
    )


def _quantile(bins: list[tuple[int, int]], q: float) -> float | None:
    """Upper edge of the bin holding the q-quantile (never under-reports drift)."""
    total = sum(n for _, n in bins)
    if total == 0:
        return None
    seen = 0
    for b, n in bins:
        seen += n
        if seen >= q * total:
            return min(b + 1, BIN) / BIN
    return 1.0


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
