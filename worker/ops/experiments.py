"""Optional experiment tracking of training runs: TensorBoard or MLflow, only when installed.

Nothing here is required: a run always writes ``metrics.jsonl``. When ``tensorboard`` is importable the run
also writes TensorBoard event files under ``RUN/tensorboard`` (through ``torch.utils.tensorboard``, so
``tensorboard --logdir runs/`` compares runs); when ``mlflow`` is importable (and TensorBoard is not, or
``MODERATION_TRACKING=mlflow``) it logs to MLflow's configured tracking URI (``MLFLOW_TRACKING_URI``, else a
local ``mlruns/``). ``MODERATION_TRACKING=off`` turns both off. A tracker that fails never fails the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from worker.settings import Settings

log = structlog.get_logger(__name__)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Tracker:
    """The no-op tracker; subclasses send to a real one."""

    name = "off"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run configuration, once."""

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        """Numeric figures of one epoch (or step); other values are skipped."""

    def close(self) -> None:
        """Flush and finish the run."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _numeric(metrics: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = json.dumps(dict(params), indent=2, default=str)
        self.writer.add_text("config", f"```\n{text}\n```")

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key.replace("val_", "val/", 1), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        self.mlflow.log_metrics(_numeric(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Guarded(Tracker):
    """Forwards to a tracker; the first failure is logged and the tracker switched off."""

    def __init__(self, inner: Tracker) -> None:
        self.inner, self.name = inner, inner.name

    def _call(self, what: str, *args: Any) -> None:
        if self.inner.name == "off":
            return
        try:
            getattr(self.inner, what)(*args)
        except Exception as exc:
            log.warning("tracking_failed", tracker=self.inner.name, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                self.inner.close()
            self.inner = Tracker()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def close(self) -> None:
        self._call("close")


def open_tracker(settings: Settings, run_dir: Path, run_name: str | None = None) -> Tracker:
    """The tracker ``settings.tracking`` asks for (``auto``: TensorBoard, else MLflow, else none)."""
    choice = settings.tracking
    if choice == "auto":
        choice = "tensorboard" if installed("tensorboard") else "mlflow" if installed("mlflow") else "off"
    try:
        if choice == "tensorboard":
            return _Guarded(TensorBoardTracker(run_dir / "tensorboard"))
        if choice == "mlflow":
            return _Guarded(MLflowTracker(run_name or run_dir.name))
    except ImportError as exc:
        log.warning("tracking_unavailable", tracker=choice, error=str(exc))
    return Tracker()
