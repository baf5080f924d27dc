"""Queue commands: ``worker``, ``submit``, ``decisions``, ``schema`` and ``demo``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    build_settings,
    console,
    err,
    fail,
    print_decision_stream,
    print_decisions,
    serve_metrics,
)
from worker.settings import Settings


def _need_redis(settings: Settings) -> str:
    return settings.require_redis("queue commands use Redis")


def worker(
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Stream entries held at once (read, not yet acked); default MODERATION_PREFETCH."),
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Crops per model call at most.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Longest a crop waits for its batch.")] = None,
    hostname: Annotated[str | None, typer.Option(help="Worker name (default host-pid).")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics on this port (with --processes N: port+i for child i)."),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes (default MODERATION_WORKER_PROCESSES, 1). Above 1 a supervisor starts "
            "children HOSTNAME-0..N-1 with these options, metrics port METRICS_PORT+i and, for device "
            "auto/cuda on a multi-GPU host, cuda:(i mod GPUs); it forwards SIGTERM/SIGINT and, if a child "
            "exits on its own, stops the others and exits non-zero.",
        ),
    ] = None,
) -> None:
    """Run a worker: read events from the Redis streams in batches and decide them until SIGTERM.

    First SIGTERM/SIGINT: stop reading, finish and ack everything held, exit. Second: exit now (held entries
    are reclaimed by other workers after the visibility timeout). With --processes N (N > 1) the same holds
    for every child (docs/queue.md, "Several processes per GPU").
    """
    from celery.exceptions import SecurityWarning
    from celery.signals import worker_ready

    from worker.errors import CheckpointError
    from worker.keys import Queues
    from worker.ops.logs import configure_logging, install_celery_logging
    from worker.ops.tracking import init_sentry
    from worker.process.app import make_app
    from worker.process.runtime import Runtime

    settings = build_settings(
        checkpoint=checkpoint,
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        metrics_port=metrics_port,
        worker_processes=processes,
        prefetch=concurrency,
    )
    _need_redis(settings)
    if settings.worker_processes > 1:
        child_options = {
            "--checkpoint": checkpoint,
            "--concurrency": concurrency,
            "--max-batch": max_batch,
            "--max-wait-ms": max_wait_ms,
        }
        common = [str(a) for k, v in child_options.items() if v is not None for a in (k, v)]
        raise typer.Exit(_supervise(settings, common, hostname, device))
    configure_logging(settings, component="worker")
    install_celery_logging(settings, component="worker")
    init_sentry(settings, "worker")
    try:
        runtime = Runtime(settings, hostname=hostname).start()
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    if settings.metrics_port:
        serve_metrics(runtime.metrics.registry, settings.metrics_port)
    app = make_app(settings)

    def on_ready(**_: Any) -> None:
        _second_signal_exits_now()
        runtime.mark_ready()

    worker_ready.connect(on_ready, weak=False)
    # Celery warns about superuser privileges because pickle content can run code; this worker accepts JSON
    # only (worker/process/app.py), so as root (a developer's shell) the warning says nothing actionable.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    w = app.Worker(
        hostname=f"{runtime.hostname}@moderation",
        pool="threads",
        concurrency=1,  # Celery's own queue carries no per-event work: events come from the streams
        queues=[Queues(settings.namespace).control],
        moderation_runtime=runtime,
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not settings.celery_events,
        quiet=True,
    )
    try:
        w.start()
    finally:
        runtime.close()
    raise typer.Exit(w.exitcode or 0)


def _supervise(settings: Settings, common: list[str], hostname: str | None, device: str | None) -> int:
    """``--processes N``: N child workers under one supervisor (worker/supervisor.py); its exit status."""
    from worker.ops.logs import configure_logging
    from worker.process.supervisor import Supervisor, plan_children, spread_devices, visible_gpus

    configure_logging(settings, component="supervisor")
    n = settings.worker_processes
    gpus = visible_gpus() if settings.device in ("auto", "cuda") else 0
    children = plan_children(
        n,
        hostname or f"{socket.gethostname()}-{os.getpid()}",
        settings.metrics_port,
        [spread or device for spread in spread_devices(settings.device, n, gpus)],
    )
    return Supervisor(children, common, drain_timeout_s=settings.visibility_timeout_s).run()


def _second_signal_exits_now() -> None:
    """First SIGTERM/SIGINT: Celery's warm shutdown (the stream consumer stops reading and drains). Second:
    exit at once.

    Celery ignores a repeated SIGTERM (only SIGINT/SIGQUIT escalate); an operator who signals twice wants the
    process gone. Entries held then are unacked, so another worker reclaims them after the visibility
    timeout: nothing is lost, only delayed.
    """
    import structlog

    log = structlog.get_logger("worker")
    seen: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            seen.append(signum)
            if len(seen) > 1:
                log.warning("second_signal_exit_now", signal=signum)
                os._exit(1)
            log.info("draining", signal=signum)
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: keep Celery's handlers
            return


def submit(
    uris: Annotated[list[str], typer.Argument(help="Image URIs (paths, file://, s3://, https://).")],
    item_id: Annotated[
        list[str] | None, typer.Option("--item-id", help="Item id per URI (default: the URI).")
    ] = None,
    urgent: Annotated[bool, typer.Option(help="Send to the urgent stream (read first).")] = False,
    callback_url: Annotated[str | None, typer.Option(help="POST each decision here (signed).")] = None,
    wait: Annotated[bool, typer.Option(help="Print each decision as it arrives.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Enqueue one event per URI; prints the event ids (and, with --wait, the decisions)."""
    from worker.ingress.producer import BacklogFull, Producer
    from worker.records import Event, Priority

    settings = build_settings()
    _need_redis(settings)
    ids = list(item_id or [])
    if ids and len(ids) != len(uris):
        raise fail("give one --item-id per URI, or none")
    events = [
        Event(
            item_id=ids[i] if ids else uri,
            image_uri=uri,
            priority=Priority.URGENT if urgent else Priority.NORMAL,
            callback_url=callback_url,
        )
        for i, uri in enumerate(uris)
    ]
    producer = Producer(settings)
    try:
        producer.submit_many(events)
    except BacklogFull as exc:
        raise fail(str(exc), 1) from exc
    if not wait:
        for e in events:
            sys.stdout.write(f"{e.event_id}\t{e.item_id}\n")
        return
    missing = {e.event_id for e in events}
    stream = producer.iter_decisions([e.event_id for e in events], timeout=timeout)
    if as_json:
        for d in stream:
            missing.discard(d.event_id)
            sys.stdout.write(d.to_json() + "\n")
            sys.stdout.flush()
    else:
        missing -= {d.event_id for d in print_decision_stream(stream, title=f"{len(events)} submitted")}
    if missing:
        raise fail(f"{len(missing)} event(s) not decided within {timeout:.0f}s: is a worker running?", 1)


def decisions(
    item_ids: Annotated[list[str], typer.Argument(help="Item ids to look up.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Look up the latest decision of each item."""
    from worker.delivery.store import DecisionStore

    settings = build_settings()
    store = DecisionStore.from_url(_need_redis(settings), settings.namespace)
    found, missing = [], []
    for item in item_ids:
        d = store.get_item(item)
        (found.append(d) if d else missing.append(item))
    if as_json:
        for d in found:
            sys.stdout.write(d.to_json() + "\n")
    elif found:
        print_decisions(found)
    if missing:
        err.print(f"no decision for: {', '.join(missing)}")
        raise typer.Exit(1)


def schema(
    which: Annotated[str, typer.Argument(help="event or decision")],
) -> None:
    """Print the JSON Schema of the event (what producers XADD) or of the decision (what they read back)."""
    from worker.ingress.contract import SCHEMAS, schema_json

    if which not in SCHEMAS:
        raise fail(f"unknown schema {which!r}: use one of {', '.join(SCHEMAS)}")
    sys.stdout.write(schema_json(which))


def demo(
    checkpoint: CheckpointOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the decisions.")] = 300.0,
) -> None:
    """The main job end to end: (private) Redis, a worker, the bundled samples in, decisions out."""
    from contextlib import ExitStack

    from worker.process.localredis import private_redis

    settings = build_settings(checkpoint=checkpoint)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moderation-demo-")))
        url = settings.redis_url
        if not url:
            console.print("[dim]no REDIS_URL set: starting a private redis-server[/]")
            try:
                url = stack.enter_context(private_redis(tmp / "redis"))
            except RuntimeError as exc:
                raise fail(str(exc)) from exc
        settings = settings.model_copy(update={"redis_url": url})
        ckpt = _demo_checkpoint(settings)
        _run_demo(settings, ckpt, tmp, timeout)


def _demo_checkpoint(settings: Settings) -> str:
    from worker.lifecycle.registry import open_registry

    uri = settings.checkpoint or open_registry(settings).current_uri()
    if uri:
        return uri
    path = settings.home / "demo-checkpoint"
    if not (path / "manifest.json").exists():
        from worker.scoring.checkpoint import init_checkpoint

        console.print(
            "[yellow]no trained checkpoint configured: creating a randomly initialised convnext_tiny at "
            f"{path} (its scores are meaningless; train or bring weights, see README)[/]"
        )
        init_checkpoint("convnext_tiny", path, seed=0)
    return str(path)


def _run_demo(settings: Settings, checkpoint: str, tmp: Path, timeout: float) -> None:
    from worker.ingress.producer import Producer
    from worker.records import Event
    from worker.samples import sample_paths

    env = dict(os.environ)
    env.update(
        REDIS_URL=settings.redis_url or "",
        MODERATION_CHECKPOINT=checkpoint,
        MODERATION_LOG_FORMAT="json",
        MODERATION_PREFETCH="32",
        # Local files are off by default: the demo allows exactly the bundled samples and its own folder.
        MODERATION_LOCAL_ROOTS=",".join(sorted({str(p.parent) for p in sample_paths()} | {str(tmp)})),
    )
    log_path = tmp / "worker.log"
    console.print(f"starting a worker (log: {log_path})")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            producer = Producer(settings)
            _wait_ready(producer, proc, log_path)
            refs = [str(p) for p in sample_paths()] + [str(tmp / "missing.jpg")]
            events = [Event(item_id=Path(r).name, image_uri=r) for r in refs]
            t0 = time.monotonic()
            producer.submit_many(events)
            got = producer.wait([e.event_id for e in events], timeout=timeout)
            elapsed = time.monotonic() - t0
            if len(got) < len(events):
                raise fail(f"only {len(got)}/{len(events)} decisions arrived; see {log_path}", 1)
            print_decisions([got[e.event_id] for e in events], title=f"{len(events)} decisions")
            console.print(
                f"decided {len(events)} events in {elapsed:.1f}s through a Redis stream and a worker; "
                "the missing file shows an error decision with its reason"
            )
        except BaseException:
            sys.stderr.write(log_path.read_text(errors="replace")[-3000:])
            raise
        finally:
            _stop(proc)


def _wait_ready(producer: Any, proc: subprocess.Popen[bytes], log_path: Path, limit: float = 180.0) -> None:
    from worker.process.runtime import live_workers

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"the worker exited with code {proc.returncode}; see {log_path}", 1)
        if any(w.get("ready") == "1" for w in live_workers(producer.store.r, producer.settings.namespace)):
            return
        time.sleep(0.2)
    raise fail(f"the worker did not become ready in {limit:.0f}s; see {log_path}", 1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(submit)
    app.command()(decisions)
    app.command()(schema)
    app.command()(demo)
