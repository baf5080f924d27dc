"""Progress of long loops (train epochs, scoring for evaluate, probe and gate) that suits where it is read.

A terminal gets a tqdm bar. A log file, CI job or ``docker logs`` gets plain lines (``score: 120/480 (25%),
3.1 it/s, eta 1m56s``) at most every ``interval_s`` seconds and at the end, because tqdm's carriage returns
turn a redirected stderr into one very long line. ``MODERATION_PROGRESS=bar|lines|off`` overrides the
choice.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Progress(Protocol[T_co]):
    """What callers use of a progress wrapper: iterate it, attach figures to it."""

    def __iter__(self) -> Iterator[T_co]: ...

    def set_postfix(self, **values: Any) -> Any: ...


def _mode(stream: IO[str]) -> str:
    forced = os.environ.get("MODERATION_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress(Generic[T]):
    """tqdm's iterable interface (``set_postfix``, ``update``, ``close``) writing whole lines."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        *,
        desc: str,
        total: int | None,
        unit: str,
        stream: IO[str],
        interval_s: float,
    ) -> None:
        self.iterable = iterable
        self.desc, self.total, self.unit, self.stream = desc, total, unit, stream
        self.interval_s = interval_s
        self.n = 0
        self.postfix = ""
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(final=True)

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, final: bool = False) -> None:
        self.stream.write(self.line(final) + "\n")
        self.stream.flush()


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    stream: IO[str] | None = None,
    interval_s: float = 10.0,
) -> Progress[T]:
    """Wrap a loop: a tqdm bar on a terminal, a line every ``interval_s`` seconds elsewhere, nothing when
    ``enabled`` is false (e.g. on every DDP rank but the first)."""
    out = stream or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    mode = _mode(out) if enabled else "off"
    if mode in ("bar", "off"):
        from tqdm.auto import tqdm

        # off: a disabled tqdm, a pass-through that still takes set_postfix
        return tqdm(
            iterable,
            desc=desc,
            total=total,
            unit=unit,
            leave=False,
            dynamic_ncols=True,
            file=out,
            disable=mode == "off",
        )
    return LineProgress(iterable, desc=desc, total=total, unit=unit, stream=out, interval_s=interval_s)
