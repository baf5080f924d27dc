#!/usr/bin/env python
"""Write ops/grafana/moderation.json, the Grafana dashboard of the moderation workers.

The dashboard is generated rather than hand-edited so every panel is one readable line of PromQL here and
the JSON stays consistent (ids, grid positions, datasource). Edit this file, run it, commit both:

    python scripts/ops_dashboard.py            # rewrite the JSON
    python scripts/ops_dashboard.py --check    # exit 1 if the JSON is stale (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "ops" / "grafana" / "moderation.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def q(expr: str, legend: str = "", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, **extra}


def quantiles(metric: str, by: str = "le") -> list[dict[str, Any]]:
    return [
        q(f"histogram_quantile({p}, sum by ({by}) (rate({metric}_bucket[{RI}])))", f"p{round(p * 100)}")
        for p in (0.5, 0.9, 0.99)
    ]


# (title, kind, unit, description, targets), laid out in rows of up to three panels.
Row = tuple[str, list[tuple[str, str, str, str, list[dict[str, Any]]]]]
ROWS: list[Row] = [
    (
        "Traffic and outcomes",
        [
            (
                "Decisions per second by verdict",
                "timeseries",
                "ops",
                "Every decision written, by verdict.",
                [q(f"sum by (verdict) (rate(moderation_decisions_total[{RI}]))", "{{verdict}}")],
            ),
            (
                "Error ratio",
                "timeseries",
                "percentunit",
                "Share of decisions that are errors (the ModerationFailureRatioHigh alert fires above 5%).",
                [
                    q(
                        f'sum(rate(moderation_decisions_total{{verdict="error"}}[{RI}]))'
                        f" / sum(rate(moderation_decisions_total[{RI}]))",
                        "error ratio",
                    )
                ],
            ),
            (
                "Errors per second by reason",
                "timeseries",
                "ops",
                "Machine-readable reasons of error decisions (not_an_image, s3_object_not_found, ...).",
                [q(f"sum by (reason) (rate(moderation_errors_total[{RI}]))", "{{reason}}")],
            ),
        ],
    ),
    (
        "Capacity",
        [
            (
                "Queue depth",
                "timeseries",
                "short",
                "Messages waiting in the broker, per queue (every worker reports the same value).",
                [q("max by (queue) (moderation_queue_depth)", "{{queue}}")],
            ),
            (
                "In-flight events per worker",
                "timeseries",
                "short",
                "Events a worker holds and has not decided yet (bounded by prefetch).",
                [q("sum by (instance) (moderation_in_flight)", "{{instance}}")],
            ),
            (
                "Workers up",
                "stat",
                "short",
                "Worker processes answering scrapes.",
                [q('sum(up{job="moderation-worker"})', "up")],
            ),
            (
                "Throughput per worker",
                "timeseries",
                "ops",
                "Decisions per second by worker process: an idle one next to busy ones is stuck.",
                [q(f"sum by (instance) (rate(moderation_decisions_total[{RI}]))", "{{instance}}")],
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "End-to-end latency (submit to decision)",
                "timeseries",
                "s",
                "What the upload pipeline experiences; the ModerationLatencyP99High alert uses p99.",
                quantiles("moderation_end_to_end_seconds"),
            ),
            (
                "Queue wait (submit to pick-up)",
                "timeseries",
                "s",
                "Time an event waits for a worker: high here and low model time means too few workers.",
                quantiles("moderation_queue_wait_seconds"),
            ),
            (
                "Model time per batch",
                "timeseries",
                "s",
                "One forward pass over a micro-batch of crops.",
                quantiles("moderation_model_seconds"),
            ),
            (
                "Batch size (crops per model call)",
                "timeseries",
                "short",
                "Small batches under load mean the batcher times out before batches fill.",
                [
                    *quantiles("moderation_batch_crops"),
                    q(
                        f"sum(rate(moderation_batch_crops_sum[{RI}]))"
                        f" / sum(rate(moderation_batch_crops_count[{RI}]))",
                        "mean",
                    ),
                ],
            ),
        ],
    ),
    (
        "Stages",
        [
            (
                "Fetch time per image",
                "timeseries",
                "s",
                "Bytes from file, S3 or HTTPS, retries included: a slow origin shows here first.",
                quantiles("moderation_fetch_seconds"),
            ),
            (
                "Decode and crop time per image",
                "timeseries",
                "s",
                "Pillow decode and native crops (or the image's share of a device decode batch).",
                quantiles("moderation_decode_seconds"),
            ),
        ],
    ),
    (
        "Model",
        [
            (
                "Model version per worker",
                "table",
                "none",
                "The checkpoint each worker process serves right now.",
                [q("max by (instance, version) (moderation_model_info)", "", format="table", instant=True)],
            ),
            (
                "Reloads and reload failures",
                "timeseries",
                "short",
                "Successful model swaps, versions refused (by reason), and starts that fell back to an older "
                "version, in the last hour.",
                [
                    q("sum(increase(moderation_reloads_total[1h]))", "reloads"),
                    q(
                        "sum by (reason) (increase(moderation_reload_failures_total[1h]))",
                        "failed: {{reason}}",
                    ),
                    q("sum(increase(moderation_model_fallbacks_total[1h]))", "fell back at start"),
                ],
            ),
            (
                "ai_score distribution",
                "heatmap",
                "short",
                "Histogram of scores over time; a shift is drift (new generator, new upload mix, new model).",
                [q(f"sum by (le) (increase(moderation_ai_score_bucket[{RI}]))", "{{le}}", format="heatmap")],
            ),
            (
                "Mean ai_score, today vs yesterday",
                "timeseries",
                "short",
                "The ModerationScoreDriftMean alert fires when these differ by more than 0.1 for 30 minutes.",
                [
                    q(
                        "sum(rate(moderation_ai_score_sum[1h])) / sum(rate(moderation_ai_score_count[1h]))",
                        "now",
                    ),
                    q(
                        "sum(rate(moderation_ai_score_sum[1h] offset 1d))"
                        " / sum(rate(moderation_ai_score_count[1h] offset 1d))",
                        "24 h earlier",
                    ),
                ],
            ),
            (
                "Share scoring above 0.5, today vs yesterday",
                "timeseries",
                "percentunit",
                "Images the model considers likely AI-generated (feeds the review queue).",
                [
                    q(
                        '1 - sum(rate(moderation_ai_score_bucket{le="0.5"}[1h]))'
                        " / sum(rate(moderation_ai_score_count[1h]))",
                        "now",
                    ),
                    q(
                        '1 - sum(rate(moderation_ai_score_bucket{le="0.5"}[1h] offset 1d))'
                        " / sum(rate(moderation_ai_score_count[1h] offset 1d))",
                        "24 h earlier",
                    ),
                ],
            ),
        ],
    ),
    (
        "Delivery",
        [
            (
                "Dead letters by reason",
                "timeseries",
                "short",
                "Events that could not be decided; replay them with `moderation dlq replay` after a fix.",
                [q(f"sum by (reason) (increase(moderation_dead_letters_total[{RI}]))", "{{reason}}")],
            ),
            (
                "Duplicate deliveries",
                "timeseries",
                "ops",
                "Redelivered events that were already decided (at-least-once delivery at work).",
                [q(f"sum(rate(moderation_duplicate_deliveries_total[{RI}]))", "duplicates")],
            ),
            (
                "Webhook deliveries by outcome",
                "timeseries",
                "ops",
                "delivered (2xx), rejected (4xx, not retried), failed (retries exhausted).",
                [q(f"sum by (outcome) (rate(moderation_webhook_deliveries_total[{RI}]))", "{{outcome}}")],
            ),
        ],
    ),
    (
        "Review",
        [
            (
                "Review backlog",
                "timeseries",
                "short",
                "Items waiting for a moderator (ModerationReviewBacklogStale watches their age).",
                [q("max(moderation_review_queue_items)", "items")],
            ),
            (
                "Oldest item waiting for review",
                "timeseries",
                "s",
                "Age of the oldest review item: the time a moderator's answer is late by.",
                [q("max(moderation_review_oldest_item_age_seconds)", "oldest")],
            ),
        ],
    ),
    (
        "Processes",
        [
            (
                "Resident memory per worker",
                "timeseries",
                "bytes",
                "process_resident_memory_bytes: a line that only grows is a leak.",
                [q('process_resident_memory_bytes{job="moderation-worker"}', "{{instance}}")],
            ),
            (
                "CPU per worker",
                "timeseries",
                "percentunit",
                "CPU seconds per second, all threads of the process.",
                [q(f'rate(process_cpu_seconds_total{{job="moderation-worker"}}[{RI}])', "{{instance}}")],
            ),
            (
                "Restarts (process start time)",
                "timeseries",
                "short",
                "Process starts in the last hour per worker: crash loops show here.",
                [q('changes(process_start_time_seconds{job="moderation-worker"}[1h])', "{{instance}}")],
            ),
        ],
    ),
    (
        "Redis",
        [
            (
                "Redis memory used vs limit",
                "timeseries",
                "bytes",
                "From redis_exporter; ModerationRedisMemoryHigh fires above 90% of maxmemory.",
                [
                    q("max(redis_memory_used_bytes)", "used"),
                    q("max(redis_memory_max_bytes)", "maxmemory"),
                ],
            ),
            (
                "Redis commands per second",
                "timeseries",
                "ops",
                "All commands the broker and decision store serve.",
                [q(f"sum(rate(redis_commands_processed_total[{RI}]))", "commands")],
            ),
            (
                "Stream consumer-group lag and pending",
                "timeseries",
                "short",
                "Events not yet read by a group (lag) and read but not acked (pending), per stream.",
                [
                    q("max by (stream, group) (redis_stream_group_lag)", "lag {{stream}}/{{group}}"),
                    q(
                        "max by (stream, group) (redis_stream_group_messages_pending)",
                        "pending {{stream}}/{{group}}",
                    ),
                ],
            ),
            (
                "Redis clients and evictions",
                "timeseries",
                "short",
                "Connected clients, and keys evicted under memory pressure (must stay 0:"
                " decisions are data).",
                [
                    q("max(redis_connected_clients)", "clients"),
                    q(f"sum(increase(redis_evicted_keys_total[{RI}]))", "evicted"),
                ],
            ),
        ],
    ),
]


def panel(
    pid: int, x: int, y: int, w: int, spec: tuple[str, str, str, str, list[dict[str, Any]]]
) -> dict[str, Any]:
    title, kind, unit, description, targets = spec
    p: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": "short"}, "color": {"scheme": "Oranges"}}
    return p


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, specs in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            }
        )
        pid, y = pid + 1, y + 1
        per_line = 2 if len(specs) in (2, 4) else 3
        width = 24 // per_line
        for i, spec in enumerate(specs):
            if i and i % per_line == 0:
                y += 8
            panels.append(panel(pid, (i % per_line) * width, y, width, spec))
            pid += 1
        y += 8
    return {
        "uid": "moderation-workers",
        "title": "Moderation workers",
        "description": "Image moderation: traffic, errors, latency, model, drift, review, Redis. "
        "See ops/runbook.md.",
        "tags": ["moderation"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                }
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if the committed JSON is stale.")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/ops_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
