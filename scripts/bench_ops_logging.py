#!/usr/bin/env python
"""How many JSON log lines per second one core writes through ``worker.ops.logs`` (ours and stdlib's).

Celery's default would be three lines per event ("received", "succeeded", and our "decided"), so at
thousands of events per second the logging pipeline is a budget item. This measures, in one thread, lines
per second for: a structlog line with the event ids bound, a stdlib record routed through the same
processors (what Celery's lines cost), Celery's per-task INFO line that is quiet by default (what dropping it
costs), and the metric updates of one decided event for comparison.

    python scripts/bench_ops_logging.py [--lines 50000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from worker.ops.logs import bind_event, configure_logging, get_logger
from worker.ops.metrics import Metrics
from worker.settings import Settings


def rate(n: int, fn: object) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)  # type: ignore[operator]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        configure_logging(Settings(log_format="json"), component="worker", stream=sink)
        log = get_logger("bench")
        bind_event("0123456789abcdef0123456789abcdef", item_id="item-123", model_version="v1", task_id="t-1")
        stdlib = logging.getLogger("celery.worker.consumer")  # routed through the structlog processors
        trace = logging.getLogger("celery.app.trace")  # per-task INFO lines, quiet by default
        metrics = Metrics()

        def ours(i: int) -> None:
            log.info("decided", verdict="allow", ai_score=0.12345)

        def theirs(i: int) -> None:
            stdlib.info("Task %s[%s] succeeded in %ss: %s", "moderation.decide", i, 0.01, None)

        def dropped(i: int) -> None:
            trace.info("Task %s[%s] succeeded in %ss: %s", "moderation.decide", i, 0.01, None)

        def account(i: int) -> None:
            metrics.decisions.labels("allow").inc()
            metrics.scores.observe(0.12345)
            metrics.latency.observe(0.05)

        results = {
            "structlog_lines_per_s": rate(args.lines, ours),
            "stdlib_routed_lines_per_s": rate(args.lines, theirs),
            "celery_task_info_dropped_per_s": rate(args.lines, dropped),
            "metric_updates_per_event_per_s": rate(args.lines, account),
        }
    print(json.dumps({k: round(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
