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
        300,
        ge=1,
        description="A stream entry a worker read and did not ack is reclaimed (XAUTOCLAIM) by another "
        "worker once idle this long; held entries are refreshed, so only a dead worker's come back.",
    )
    prefetch: int = Field(
        256, ge=1, description="Stream entries a worker holds (read, not yet acked) at most."
    )
    max_deliveries: int = Field(3, description="Deliveries before an event is dead-lettered.")
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key that signs webhook bodies.")

    # --- operations ---------------------------------------------------------------------------------
    sentry_dsn: str | None = Field(
        None, validation_alias=AliasChoices("MODERATION_SENTRY_DSN", "SENTRY_DSN", "sentry_dsn")
    )
    metrics_port: int | None = Field(None, description="Serve Prometheus metrics on this port.")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    # --- queue worker ---------------------------------------------------------------------------------
    heartbeat_s: float = Field(5.0, description="Worker heartbeat (and queue-depth sample) period.")
    webhook_timeout_s: float = 5.0
    webhook_retries: int = Field(3, description="Attempts per webhook, with exponential backoff.")
    redis_retries: int = Field(
        5, description="Attempts to write a batch's decisions while Redis is unreachable."
    )
    worker_processes: int = Field(
        1,
        ge=1,
        description="Worker processes per `moderation worker` unit; above 1 a supervisor runs them "
        "(worker/process/supervisor.py). One process's decode and bookkeeping run under one GIL while one "
        "GPU scores about 7,500 crops/s, so a GPU host runs several.",
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

    # --- stream ingress ------------------------------------------------------------------------------
    read_count: int | None = Field(
        None, ge=1, description="Entries per XREADGROUP at most; unset: max_batch (one read per model call)."
    )
    read_block_ms: int = Field(
        200, ge=1, description="How long an idle worker blocks in XREADGROUP (also its drain latency)."
    )
    reclaim_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often a worker looks for other workers' entries past the visibility timeout.",
    )
    max_backlog: int = Field(
        1_000_000,
        ge=1,
        description="Entries (unread + held) a stream may hold; past it Producer.submit raises BacklogFull. "
        "Entries no worker has read are never trimmed.",
    )
    max_event_bytes: int = Field(
        1_048_576, ge=1, description="Larger stream entries are dead-lettered whole (event_too_large)."
    )
    record_ttl_s: int | None = Field(
        7 * 86400,
        ge=1,
        description="Lifetime of decision, item and audit records in Redis (the archive keeps them); unset: "
        "never expire. Must exceed how long an item may wait for a moderator.",
    )
    decisions_maxlen: int = Field(
        1_000_000, ge=1, description="Approximate length the decisions stream is trimmed to (MAXLEN ~)."
    )

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def default_registry(self) -> str:
        return self.registry or str(self.home / "registry")
