"""The one settings object, built at the edge (environment, ``.env`` or CLI) and passed down.

Every knob that changes behaviour lives here with its default and the reason for it, so an operator reads one
file. Environment variables are ``MODERATION_<FIELD>``; ``REDIS_URL`` and ``SENTRY_DSN`` are also honoured
because every deployment tool already sets them.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_HOME = Path.home() / ".moderation"
CPU_FORWARD_BATCH = 16  # crops per CPU forward pass unless forward_batch says otherwise


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
    forward_batch: int | None = Field(
        None,
        ge=1,
        description="Crops per forward pass within a model call. Unset: one pass on CUDA; on CPU at most "
        f"{CPU_FORWARD_BATCH}, since a CPU pass over more crops runs no faster and holds their activations "
        "in host memory (convnext_tiny at 224 px: about 10 MB per crop).",
    )
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

    # --- queue worker ---------------------------------------------------------------------------------
    heartbeat_s: float = Field(5.0, description="Worker heartbeat (and queue-depth sample) period.")
    webhook_timeout_s: float = Field(5.0, description="Read timeout of one webhook delivery.")
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

    # --- decision archive ----------------------------------------------------------------------------
    archive_uri: str | None = Field(
        None,
        description="Where `moderation archive` writes every decision, override and audit entry as "
        "hour-partitioned Parquet: a folder or s3://bucket/prefix (docs/archive.md).",
    )
    archive_batch: int = Field(
        10_000, ge=1, description="Entries per part file at most (fewer, larger files are cheaper to read)."
    )
    archive_flush_s: float = Field(
        60.0,
        gt=0,
        description="Longest an entry waits before its part is written (Redis keeps it until then).",
    )
    archive_group: str = Field(
        "archive", description="The archiver's consumer group on the decisions stream."
    )
    archive_consumer: str | None = Field(
        None, description="Consumer name in that group; keep it stable across restarts. Unset: archive-HOST."
    )
    archive_claim_idle_s: float = Field(
        300.0,
        gt=0,
        description="Entries another archiver held unacked this long are taken over (XAUTOCLAIM); at least "
        "twice archive_flush_s, so a live archiver's buffer is never taken.",
    )
    archive_stream_retention_s: float | None = Field(
        None,
        ge=0,
        description="The archiver trims decisions-stream entries older than this once every consumer group "
        "has acked them (so only archived ones); readers without a group get this long. Unset: only the "
        "stream's MAXLEN bounds it (docs/archive.md, memory sizing).",
    )

    # --- review page: team work (claims, second review, queue age) -------------------------------------
    review_claim_lease_s: float = Field(
        900.0, gt=0, description="How long a moderator's claim on a queued item lasts before it returns."
    )
    review_claim_batch: int = Field(10, ge=1, le=200, description="Items 'Claim next' takes at once.")
    review_second_review: bool = Field(
        False, description="A first moderator's block of a queued item waits for a second moderator."
    )
    review_sla_s: float = Field(
        4 * 3600.0, gt=0, description="Queue age past which a row is flagged overdue (amber from half of it)."
    )

    # --- untrusted input: local files and decode memory ----------------------------------------------
    local_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a file:// or plain-path image_uri may name (comma-separated or a JSON list); "
        "symlinks are resolved and must stay inside. Empty: local files are refused (forbidden_source).",
    )
    local_read_timeout_s: float = Field(
        10.0, gt=0, description="Longest a local file read may take (a hung network mount, a slow disk)."
    )
    max_decode_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="Memory one decode may need (pixels x bytes per sample x working copies, from the "
        "header) and the total all concurrent decodes of a process may hold; the review page shares it.",
    )

    review_login_free_attempts: int = Field(
        5, ge=1, description="Failed sign-ins a client address gets before exponential delays start."
    )
    review_login_delay_s: float = Field(1.0, gt=0, description="First delay; it doubles with each failure.")
    review_login_max_delay_s: float = Field(900.0, gt=0, description="Longest delay a client address gets.")
    review_login_name_free_attempts: int = Field(
        20, ge=1, description="Failed sign-ins an account name gets (from all addresses) before delays."
    )
    review_login_name_max_delay_s: float = Field(
        30.0, gt=0, description="Longest delay per name: low, so guessers cannot lock the owner out."
    )
    review_login_concurrency: int = Field(2, ge=1, description="Password checks running at once per process.")

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

    # --- provenance and near-duplicates (worker/media/provenance.py, worker/scoring/duplicates.py) -----
    provenance: bool = Field(True, description="Read C2PA credentials, XMP and EXIF from the fetched bytes.")
    provenance_trust_anchors: Path | None = Field(
        None,
        description="PEM file of root certificates whose C2PA signers count as proof. Unset: no credential "
        "is trusted, so none changes a verdict (they are still read and recorded).",
    )
    provenance_trust_config: str | None = Field(
        None, description="Allowed extended key usage OIDs of signing certificates, one per line (C2PA SDK)."
    )
    provenance_ai_source_types: list[str] = Field(
        default_factory=lambda: ["trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"],
        description="IPTC digital source types that declare an image made by (or with) generative AI.",
    )
    provenance_declared_ai_verdict: Literal["block", "review", "off"] = Field(
        "block",
        description="Verdict (at least) for a trusted credential that declares AI; off: it only annotates. "
        "Unsigned or untrusted metadata always only annotates.",
    )
    duplicates: bool = Field(True, description="PDQ-hash images and reuse decisions of near-duplicates.")
    duplicate_threshold: int = Field(
        31, ge=0, le=128, description="Largest PDQ Hamming distance (of 256 bits) that counts as a copy."
    )
    duplicate_min_quality: int = Field(
        50, ge=0, le=100, description="PDQ quality below which an image is too flat to hash reliably."
    )
    duplicate_reuse_model: bool = Field(
        False,
        description="A copy of a model decision by the same model version reuses its score instead of "
        "running the model again (a moderator's verdict is always inherited).",
    )
    duplicate_max_entries: int = Field(200_000, ge=1, description="Hashes kept in the duplicate index.")
    duplicate_ttl_s: int = Field(
        7 * 86400, ge=1, description="How long a decided hash stays matchable (the decisions' retention)."
    )

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

    def require_redis(self, purpose: str = "") -> str:
        """The Redis URL, or :class:`RedisNotConfigured` saying what needed it (one rule for every caller)."""
        if not self.redis_url:
            raise RedisNotConfigured(purpose)
        return self.redis_url

    def resolved_device(self) -> str:
        """The torch device to use; a CUDA device this host does not have is a :class:`DeviceUnavailable`."""
        return resolve_device(self.device)

    @property
    def default_registry(self) -> str:
        return self.registry or str(self.home / "registry")

    # --- observability: events for Flower, experiment tracking ------------------------------------------
    celery_events: bool = Field(
        False,
        description="Send Celery task events and worker heartbeats (Flower, celery-exporter, "
        "`celery events`). Off by default: with a stream ingress there are few tasks to show, and each "
        "event is a Redis publish (docs/operations.md).",
    )
    tracking: Literal["auto", "off", "tensorboard", "mlflow"] = Field(
        "auto",
        description="Experiment tracker of training runs: auto uses TensorBoard or MLflow when installed.",
    )

    # --- how the environment is read (keep this block last) ------------------------------------------
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment and ``.env`` as usual, except that list settings also take ``a,b,c``."""
        dotenv = _CommaListDotEnv(
            settings_cls,
            env_file=getattr(dotenv_settings, "env_file", None),
            env_file_encoding=getattr(dotenv_settings, "env_file_encoding", None),
        )
        return init_settings, _CommaListEnv(settings_cls), dotenv, file_secret_settings


def resolve_device(device: str) -> str:
    """``auto`` made concrete; a CUDA device this host does not have is a :class:`DeviceUnavailable`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device} requested but this host has no usable CUDA GPU")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {device} requested but this host has {torch.cuda.device_count()} GPU(s)"
            )
    return device


class DeviceUnavailable(RuntimeError):
    """The configured torch device does not exist on this host (e.g. ``cuda`` without a GPU)."""


class RedisNotConfigured(ValueError):
    """A command or component that needs Redis was started without a Redis URL."""

    def __init__(self, purpose: str = "") -> None:
        needs = f" ({purpose})" if purpose else ""
        super().__init__(
            f"no Redis configured{needs}; fix: set REDIS_URL (e.g. redis://127.0.0.1:6379/0) "
            "or pass --redis-url"
        )


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if typing.get_origin(annotation) is not None)


def _split_list(field: FieldInfo, value: Any) -> Any:
    """``cdn.example.com`` or ``a.com, b.com``: a list setting in the form every shell user writes. A value
    starting with ``[`` is still read as JSON."""
    if isinstance(value, str) and _is_list(field.annotation) and not value.lstrip().startswith("["):
        return [part.strip() for part in value.split(",") if part.strip()]
    return None


class _CommaListEnv(EnvSettingsSource):
    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        split = _split_list(field, value)
        return split if split is not None else super().decode_complex_value(field_name, field, value)


class _CommaListDotEnv(DotEnvSettingsSource):
    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        split = _split_list(field, value)
        return split if split is not None else super().decode_complex_value(field_name, field, value)
