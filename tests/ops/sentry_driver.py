"""A process that initialises Sentry the way a worker does, then plays one scenario.

Run in a subprocess (``python -m tests.ops.sentry_driver SCENARIO N_BAD DIR``) so sentry-sdk's process-wide
state never leaks into the test process. Bad images are real files that fail to decode, turned into ``error``
decisions by the real fetch and decode path (no model: torch would only slow the subprocess down).
"""

from __future__ import annotations

import sys
from pathlib import Path

from worker.errors import ModerationError
from worker.media.decode import decode_image
from worker.media.fetch import Fetcher
from worker.ops.logs import bound, configure_logging, get_logger
from worker.ops.tracking import capture_exception, flush, init_sentry, item_error_breadcrumb
from worker.records import Decision, Verdict
from worker.settings import Settings


def main() -> None:
    scenario, n_bad, workdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=workdir / "home", log_format="json")
    configure_logging(settings, component="worker")
    enabled = init_sentry(settings, "worker")
    print(f"sentry_enabled={enabled}", flush=True)
    log = get_logger("driver")
    fetcher = Fetcher(settings)
    for i in range(n_bad):
        path = workdir / f"bad-{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes([i % 256]) * 32)
        try:
            decode_image(
                fetcher.fetch(str(path)),
                max_pixels=settings.max_pixels,
                allowed_formats=settings.allowed_formats,
            )
            raise SystemExit("a garbage file decoded")
        except ModerationError as exc:
            decision = Decision(
                item_id=f"item-{i}",
                event_id=f"bad-{i}",
                image_uri=str(path),
                verdict=Verdict.ERROR,
                reason=exc.reason,
                detail=exc.detail,
                model_version="v-test",
            )
        log.warning("item_error", reason=decision.reason, event_id=decision.event_id)
        item_error_breadcrumb(decision)
    if scenario == "crash":
        # Reported where it is caught (with the ids bound) and then escapes to the process's excepthook:
        # Sentry must still count it once.
        with bound(event_id="the-crash", item_id="item-crash", model_version="v-test"):
            try:
                raise RuntimeError("model call failed: CUDA error (simulated)")
            except RuntimeError as exc:
                capture_exception(exc)
                raise
    flush()


if __name__ == "__main__":
    main()
