"""Retraining as a job: a Celery task on its own ``{ns}.training`` queue, with status in Redis.

Status lives in ``Keys.training_job`` (a hash: state, submitted_at, started_at, finished_at, request,
run_dir, version, report and gate as JSON, error) and ``Keys.training_jobs`` (job ids by submission time).

Training runs on a separate queue consumed by a separate worker (``moderation train-worker``, solo pool, one
job at a time) so a retrain never competes with decisions for a worker slot, and scoring workers never import
the trainer. Unlike decisions, the training task is acknowledged when it starts (``acks_late=False``): a
half-finished training job must not be silently re-run by another worker after the visibility timeout; if
the trainer dies the job stays ``running`` with a stale ``heartbeat_at``, and an engineer resubmits.
"""

from __future__ import annotations

import json
import traceback
import uuid
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field

from training.options import GatePolicy
from worker.keys import Keys
from worker.records import utcnow
from worker.settings import Settings

TRAIN_TASK = "moderation.train"
STATES = ("queued", "running", "succeeded", "failed", "rejected")


class JobRequest(BaseModel):
    """What an engineer asks for: a labels table, recipe options, and whether to gate-and-publish."""

    labels: str
    options: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields, e.g. epochs.")
    publish: bool = False
    overrides_from_redis: bool = True
    policy: GatePolicy = Field(default_factory=GatePolicy)
    n_boot: int = 1000


class JobStore:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r: Any = client
        self.keys = Keys(namespace)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        url = settings.require_redis("training jobs are queued in Redis")
        return cls(redis.Redis.from_url(url, decode_responses=True), settings.namespace)

    def key(self, job_id: str) -> str:
        return self.keys.training_job(job_id)

    @property
    def index(self) -> str:
        return self.keys.training_jobs

    def create(self, request: JobRequest) -> str:
        job_id = uuid.uuid4().hex[:12]
        now = utcnow()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self.key(job_id),
            mapping={
                "job_id": job_id,
                "state": "queued",
                "submitted_at": now.isoformat(),
                "request": request.model_dump_json(),
            },
        )
        pipe.zadd(self.index, {job_id: now.timestamp()})
        pipe.execute()
        return job_id

    def update(self, job_id: str, **fields: Any) -> None:
        values = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fields.items()}
        values["heartbeat_at"] = utcnow().isoformat()
        self.r.hset(self.key(job_id), mapping=values)

    def get(self, job_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(self.key(job_id)))

    def latest(self, n: int = 1) -> list[str]:
        return [str(j) for j in self.r.zrevrange(self.index, 0, n - 1)]


def run_job(settings: Settings, job_id: str, request: JobRequest) -> dict[str, str]:
    """The task body: train, evaluate on the held-out split, gate and publish; every step lands in Redis."""
    from training.evaluate import evaluate_scores, score_with_checkpoint
    from training.gate import gate, gate_and_publish
    from training.labels import load_labels, overrides_from_store, regression_set
    from training.options import TrainConfig
    from training.recipe import train
    from worker.delivery.store import DecisionStore
    from worker.lifecycle.registry import open_registry

    store = JobStore.from_settings(settings)
    store.update(job_id, state="running", started_at=utcnow().isoformat())
    try:
        run_dir = Path(request.options.get("out") or settings.home / "runs" / job_id)
        cfg = TrainConfig.model_validate(
            {**request.options, "labels": request.labels, "out": str(run_dir), "progress": False}
        )
        overrides = []
        if request.overrides_from_redis and settings.redis_url:
            overrides = overrides_from_store(DecisionStore.from_url(settings.redis_url, settings.namespace))
        store.update(job_id, run_dir=str(run_dir), stage="train")
        result = train(cfg, settings, overrides=overrides)
        assert result is not None and result.manifest is not None
        store.update(job_id, stage="evaluate", version=result.manifest.version, history=result.history)
        table, _ = load_labels(run_dir / "splits.csv")
        table = table.assign(
            score=score_with_checkpoint(str(result.checkpoint), list(table["image_uri"]), settings)
        )
        split = "test" if (table["split"] == "test").any() else "val"
        if not (table["split"] == split).any():
            raise ValueError(
                f"no test or val items in {run_dir / 'splits.csv'} to evaluate on; fix: add labels, "
                "mark rows split=test, or lower the min_heldout_per_class option"
            )
        report = evaluate_scores(
            table, name=result.manifest.version, split=split, n_boot=request.n_boot, out_dir=run_dir / "eval"
        )
        store.update(job_id, stage="gate", report=report.model_dump(mode="json"))
        registry = open_registry(settings)
        heldout = table[table["split"] == split]
        fn = gate_and_publish if request.publish else gate
        g = fn(
            result.checkpoint,
            heldout,
            regression_set(overrides, exclude=table.loc[table["split"] == "train", "image_uri"]),
            registry,
            settings,
            request.policy,
        )
        state = "succeeded" if g.passed else "rejected"
        store.update(
            job_id,
            state=state,
            stage="done",
            gate=g.model_dump(mode="json"),
            finished_at=utcnow().isoformat(),
        )
    except Exception as exc:
        store.update(
            job_id,
            state="failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-4000:],
            finished_at=utcnow().isoformat(),
        )
    return store.get(job_id)


def make_training_app(settings: Settings) -> Any:
    """The queue program (``worker.process.app.make_app``) plus the training task, on ``{ns}.training``."""
    from worker.process.app import Queues, make_app

    app = make_app(settings)
    q = Queues(settings.namespace)
    app.conf.task_routes = {**(app.conf.task_routes or {}), TRAIN_TASK: {"queue": q.training}}

    @app.task(name=TRAIN_TASK, acks_late=False, ignore_result=True)
    def train_task(job_id: str, request_json: str) -> None:
        run_job(app.settings, job_id, JobRequest.model_validate_json(request_json))

    return app


def submit(settings: Settings, request: JobRequest) -> str:
    """Record the job as queued, then enqueue it on the training queue; returns the job id."""
    from worker.process.app import Queues

    store = JobStore.from_settings(settings)
    job_id = store.create(request)
    app = make_training_app(settings)
    app.send_task(
        TRAIN_TASK, args=[job_id, request.model_dump_json()], queue=Queues(settings.namespace).training
    )
    return job_id
