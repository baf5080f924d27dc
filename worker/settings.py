"""The one settings object, built at the edge (environment, ``.env`` or CLI) and passed down.

Every knob that changes behaviour lives here with its default and the reason for it, so an operator reads one
file. Environment variables are ``MODERATION_<FIELD>``; ``REDIS_URL`` and ``SENTRY_DSN`` are also honoured
because every deployment tool already sets them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".moderation"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODERATION_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where things live ------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MODERATION_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Broker and decision store. Unset: commands that need Redis start a private one.",
    )
    home: Path = Field(DEFAULT_HOME, description="Local state: default registry, caches, private Redis.")
    checkpoint: str | None = Field(
        None, description="Checkpoint directory or s3:// prefix to serve. Unset: the registry's current."
    )
    registry: str | None = Field(None, description="Registry root (directory or s3://bucket/prefix).")
    namespace: str = Field("moderation", description="Prefix of every Redis key and stream we own.")

    # --- fetch --------------------------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(None, description="Any S3-compatible store (MinIO, R2, moto).")
    s3_region: str = "us-east-1"
    https_allow_hosts: list[str] = Field(
        default_factory=list, description="Hosts an https:// image_uri may name; empty means none."
    )
    max_bytes: int = Field(25 * 1024 * 1024, description="Byte cap per image, checked while streaming.")
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    fetch_retries: int = Field(2, description="Retries of transient fetch failures, with backoff.")

    # --- decode -------------------------------------------------------------------------------------
    max_pixels: int = Field(
        50_000_000, description="Pixel cap checked from the header, before decoding (decompression bombs)."
    )
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"],
        description="Pillow format names we decode; everything else is unsupported_format.",
    )
    jpeg_decode: Literal["auto", "pillow", "torchvision"] = Field(
        "auto",
        description="Who decodes JPEGs. torchvision: batched on the model's device (nvJPEG on CUDA; Pillow "
        "cannot keep up with a GPU), other formats and refused files still go through Pillow. auto: "
        "torchvision when the model runs on CUDA, else pillow (worker/jpeg.py).",
    )
    jpeg_batch_pixels: int = Field(
        256_000_000, ge=1, description="Pixels per device decode call at most (bounds GPU memory)."
    )

    # --- model --------------------------------------------------------------------------------------
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:1, ...")
    num_crops: int | None = Field(None, description="Crops per image; unset: the checkpoint's value.")
    aggregation: Literal["max", "mean"] | None = Field(None, description="Unset: the checkpoint's value.")
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steady state).")
    golden_tolerance: float = Field(0.05, description="Allowed golden-score drift when validating a model.")

    # --- batching -----------------------------------------------------------------------------------
    max_batch: int = Field(64, description="Crops per model call at most.")
    max_wait_ms: float = Field(20.0, description="Longest a crop waits for its batch to fill.")
    decode_threads: int = Field(4, description="Threads that fetch and decode while the model runs.")

    # --- delivery -----------------------------------------------------------------------------------
    visibility_timeout_s: int = Field(
        300, description="Unacked messages of a dead worker are redelivered after this long."
    )
    prefetch: int = Field(256, description="Messages a worker holds unacked; bounds loss-free batching.")
    max_deliveries: int = Field(3, description="Deliveries before an event is dead-lettered.")
    webhook_secret: str | None = Field(
        None,
        description="Standard Webhooks signing secret (whsec_<base64>; `moderation webhooks secret` makes "
        "one). Unset: callbacks are refused (dead-lettered), never sent unsigned.",
    )

    # --- operations ---------------------------------------------------------------------------------
    sentry_dsn: str | None = Field(
        None, validation_alias=AliasChoices("MODERATION_SENTRY_DSN", "SENTRY_DSN", "sentry_dsn")
    )
    metrics_port: int | None = Field(None, description="Serve Prometheus metrics on this port.")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    # --- queue worker --------------------------------------------------------------------------------
    restore_interval_s: int = Field(
        10, description="How often a live worker sweeps for messages whose visibility timeout expired."
    )
    heartbeat_s: float = Field(5.0, description="Worker heartbeat (and queue-depth sample) period.")
    webhook_timeout_s: float = Field(5.0, description="Read timeout of one webhook delivery.")
    reap_grace_s: float | None = Field(
        None,
        description="An undecided event missing from queues and workers this long is re-sent "
        "(worker/reaper.py). Unset: the visibility timeout.",
    )
    redis_retries: int = Field(5, description="Re-publishes of an event whose decision could not be written.")
    worker_processes: int = Field(
        1,
        ge=1,
        description="Worker processes per `moderation worker` unit; above 1 a supervisor runs them "
        "(worker/supervisor.py). One process tops out near 1,000-1,500 events/s on Python/GIL cost (Celery "
        "dispatch, Redis round trips) while one GPU scores about 7,500 crops/s, so a GPU host runs several.",
    )

    # --- model registry and hot reload ---------------------------------------------------------------
    reload_poll_s: float = Field(
        5.0,
        gt=0,
        description="How often a worker re-reads the registry pointer; Redis pub/sub wakes it sooner.",
    )
    reload_warmup_batch: int = Field(
        8,
        ge=1,
        description="Dummy crops run through a new model before it is swapped in (warm-up, shape check).",
    )
    shadow_queue: int = Field(
        4,
        ge=1,
        description="Batches waiting for the shadow model; beyond it, batches are skipped, never delayed.",
    )

    # --- review page ---------------------------------------------------------------------------------
    review_users: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Page accounts as JSON {"name": {"hash": "<argon2>", "role": "moderator|admin"}}.',
    )
    review_users_file: Path | None = Field(
        None,
        description="JSON user store `moderation review add-user` writes; unset: HOME/review-users.json.",
    )
    review_secret_key: str | None = Field(
        None, description="Signs session cookies; unset: a random key kept in HOME/review-secret (0600)."
    )
    review_session_max_age_s: int = Field(8 * 3600, description="A sign-in lasts one shift.")
    review_https_only: bool = Field(False, description="Secure cookies; set behind TLS.")
    review_allowed_origins: list[str] = Field(
        default_factory=list, description="Extra Origins a form POST may come from (besides the page's own)."
    )
    review_cache_items: int = Field(256, description="Heatmaps and thumbnails kept in memory.")

    # --- HTTP API and callbacks -----------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="`moderation api` listens here (0.0.0.0 in a container).")
    api_port: int = Field(8100, description="`moderation api` port.")
    api_max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body the API reads; larger answers 413."
    )
    api_max_events: int = Field(1000, ge=1, description="Events in one POST /v1/events at most.")
    api_max_backlog: int = Field(
        100_000,
        ge=1,
        description="Submitted, undecided events above which POST /v1/events and /v1/score answer 503 "
        "(Retry-After) instead of queueing more than the workers can take.",
    )
    api_score_timeout_s: float = Field(
        10.0, gt=0, description="Longest POST /v1/score waits for its decision (then 202 with the event id)."
    )
    callback_allow_hosts: list[str] = Field(
        default_factory=list,
        description='Hosts a callback_url may name, as "host" (default port only), "host:port" or '
        '"*.example.com"; empty means callbacks are refused.',
    )
    callback_allow_http: bool = Field(
        False, description="Also allow plain http:// callbacks (https only by default)."
    )
    webhook_connect_timeout_s: float = Field(2.0, gt=0, description="Connect timeout of one delivery.")
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="Delay before each retry of a failed delivery (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: "
        "about 27 h in all); after the last the delivery is dead-lettered.",
    )
    webhook_dispatch_in_worker: bool = Field(
        True, description="Each worker process also runs a webhook dispatcher thread."
    )

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def default_registry(self) -> str:
        return self.registry or str(self.home / "registry")
