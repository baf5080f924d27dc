"""Evidence beyond the pixels, read from bytes already fetched and never from the network.

Three sources, in falling order of weight:

* **C2PA content credentials** (``c2pa-python``, the Content Authenticity Initiative's SDK): a signed
  manifest saying which tool made the image and, in its actions, the IPTC digital source type
  (``trainedAlgorithmicMedia`` for generative AI). Its validation state is kept as the SDK reports it, and
  only a manifest whose signature and bindings verify *and* whose signer chains to a configured trust anchor
  is ``trusted``; an invalid, tampered or untrusted one is recorded but is never proof. Remote manifests,
  OCSP and every other network fetch are switched off: a manifest that lives only at a URL is recorded as
  ``remote``, not fetched.
* **XMP** ``Iptc4xmpExt:DigitalSourceType``: unsigned, so anyone can write or strip it; it annotates only.
* **EXIF** camera make, model and software: unsigned too; it annotates only.

Reading never raises for an image: whatever cannot be read is recorded as such.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import c2pa
from PIL import Image
from prometheus_client import CollectorRegistry, Counter

from worker.records import CredentialState, Decision, Provenance
from worker.settings import Settings

IPTC_SOURCE_TYPE_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"
_IPTC_EXT_NS = b"http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_XMP_START, _XMP_END = b"<x:xmpmeta", b"</x:xmpmeta>"
_XMP_MAX = 1 << 20  # an XMP packet larger than this is not looked into
_EXIF_MAKE, _EXIF_MODEL, _EXIF_SOFTWARE = 0x010F, 0x0110, 0x0131
_FIELD_MAX = 200

# Container sniffing by magic bytes: the SDK is told the format, so it never guesses from a hostile file.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (8, b"WEBP", "image/webp"),
    (0, b"GIF8", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
)


def source_type_code(value: str | None) -> str | None:
    """The code at the end of an IPTC digital source type URI, e.g. ``trainedAlgorithmicMedia``."""
    if not value:
        return None
    return value.strip().rstrip("/").rsplit("/", 1)[-1][:_FIELD_MAX] or None


def sniff_mime(data: bytes) -> str | None:
    for offset, magic, mime in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return mime
    return None


def c2pa_settings(settings: Settings) -> dict[str, Any]:
    """The SDK's settings: offline verification against our trust list only."""
    trust: dict[str, Any] = {}
    if settings.provenance_trust_anchors is not None:
        # Replaces the SDK's built-in anchors: trust is the operator's explicit choice, nothing else.
        trust["trust_anchors"] = settings.provenance_trust_anchors.read_text()
    if settings.provenance_trust_config:
        trust["trust_config"] = settings.provenance_trust_config
    return {
        "verify": {
            "verify_after_reading": True,
            "verify_trust": True,
            "remote_manifest_fetch": False,
            "ocsp_fetch": False,
        },
        "core": {"allowed_network_hosts": []},
        "trust": trust,
    }


class ProvenanceReader:
    """Reads a :class:`Provenance` record from image bytes; thread-safe, one SDK context per thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ai_types = frozenset(settings.provenance_ai_source_types)
        self._sdk_settings = json.dumps(c2pa_settings(settings))
        self._local = threading.local()
        self._trusted_anchors = settings.provenance_trust_anchors is not None

    def _context(self) -> c2pa.Context:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = c2pa.Context.from_json(self._sdk_settings)
        return ctx

    def read(self, data: bytes) -> Provenance:
        """Everything the bytes say about where the image came from; never raises, never opens a socket."""
        fields: dict[str, Any] = {}
        xmp = xmp_packet(data)
        fields.update(self._credential(data, xmp))
        if xmp is not None:
            fields["xmp_source_type"] = xmp_source_type(xmp)
        fields.update(exif_fields(data))
        declared = [fields.get("credential_source_type"), fields.get("xmp_source_type")]
        fields["declared_ai"] = any(t in self.ai_types for t in declared if t)
        fields["proven_ai"] = (
            fields.get("credential") == CredentialState.TRUSTED
            and fields.get("credential_source_type") in self.ai_types
        )
        return Provenance(**fields)

    def _credential(self, data: bytes, xmp: bytes | None) -> dict[str, Any]:
        mime = sniff_mime(data)
        if mime is None:
            return {}
        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, self._context())
            if reader is None:
                return {}
            with reader:
                store = json.loads(reader.json())
        except c2pa.C2paError as exc:
            message = str(exc)
            if message.startswith(("NotSupported", "ManifestNotFound")):
                return {}
            if message.startswith("Remote"):
                url = (xmp and xmp_remote_manifest(xmp)) or _url_in(message)
                return {"credential": CredentialState.REMOTE, "remote_manifest": url}
            return {"credential": CredentialState.UNREADABLE, "validation_failures": [message[:_FIELD_MAX]]}
        except Exception as exc:  # the SDK on hostile input: still this image's problem only
            detail = f"{type(exc).__name__}: {exc}"[:_FIELD_MAX]
            return {"credential": CredentialState.UNREADABLE, "validation_failures": [detail]}
        return self._from_store(store)

    def _from_store(self, store: dict[str, Any]) -> dict[str, Any]:
        manifests = store.get("manifests") or {}
        active = manifests.get(store.get("active_manifest") or "") or {}
        state = store.get("validation_state")
        failures = [str(s.get("code")) for s in store.get("validation_status") or [] if isinstance(s, dict)]
        if state == "Trusted" and self._trusted_anchors:
            credential = CredentialState.TRUSTED
        elif state in ("Valid", "Trusted"):
            credential = CredentialState.UNTRUSTED
        else:
            credential = CredentialState.INVALID
        sig = active.get("signature_info") or {}
        return {
            "credential": credential,
            "validation_state": _text(state),
            "validation_failures": failures[:20],
            "signer": _text(sig.get("common_name")),
            "signer_org": _text(sig.get("issuer")),
            "claim_generator": _generator(active),
            "credential_source_type": _actions_source_type(active.get("assertions") or []),
        }


def _text(value: object) -> str | None:
    return str(value)[:_FIELD_MAX] if value not in (None, "") else None


def _url_in(message: str) -> str | None:
    m = re.search(r"https?://\S+", message)
    return m.group(0)[:_FIELD_MAX] if m else None


def _generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict) and info[0].get("name"):
        version = info[0].get("version")
        return _text(f"{info[0]['name']}/{version}" if version else info[0]["name"])
    return _text(manifest.get("claim_generator"))


def _actions_source_type(assertions: Iterable[Any]) -> str | None:
    """The digital source type of the credential's actions; a ``c2pa.created`` action's first."""
    found: list[tuple[int, str]] = []
    for assertion in assertions:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            if isinstance(action, dict) and action.get("digitalSourceType"):
                rank = 0 if action.get("action") == "c2pa.created" else 1
                found.append((rank, str(action["digitalSourceType"])))
    return source_type_code(min(found)[1]) if found else None


def xmp_packet(data: bytes) -> bytes | None:
    """The first XMP packet in the file (JPEG APP1, PNG iTXt, WebP XMP chunk, TIFF tag), as raw bytes."""
    start = data.find(_XMP_START)
    if start < 0:
        return None
    end = data.find(_XMP_END, start, start + _XMP_MAX)
    return data[start : end + len(_XMP_END)] if end >= 0 else None


def _prefixes(xmp: bytes, namespace: bytes) -> list[bytes]:
    """XML prefixes bound to ``namespace`` (XMP writers do not all use the conventional one)."""
    return re.findall(rb'xmlns:([A-Za-z_][\w.-]*)\s*=\s*["\']' + re.escape(namespace) + rb'["\']', xmp)


def _property(xmp: bytes, prefixes: list[bytes], name: bytes) -> str | None:
    """A simple XMP property in attribute, element or rdf:resource form, by regular expression.

    No XML parser touches the packet: it is untrusted, and the three forms are all the spec allows here.
    """
    for p in prefixes:
        qname = re.escape(p + b":" + name)
        for pattern in (
            qname + rb'\s*=\s*"([^"]*)"',
            qname + rb"\s*=\s*'([^']*)'",
            rb"<" + qname + rb"\b[^>]*\brdf:resource\s*=\s*[\"']([^\"']*)[\"']",
            rb"<" + qname + rb"\s*>\s*([^<]*?)\s*</" + qname + rb"\s*>",
        ):
            m = re.search(pattern, xmp)
            if m and m.group(1).strip():
                return m.group(1).decode("utf-8", "replace").strip()
    return None


def xmp_source_type(xmp: bytes) -> str | None:
    return source_type_code(_property(xmp, _prefixes(xmp, _IPTC_EXT_NS), b"DigitalSourceType"))


def xmp_remote_manifest(xmp: bytes) -> str | None:
    value = _property(xmp, _prefixes(xmp, b"http://purl.org/dc/terms/"), b"provenance")
    return value[:_FIELD_MAX] if value else None


def exif_fields(data: bytes) -> dict[str, str | None]:
    """EXIF make, model and software from the header (no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                exif = img.getexif()
    except Exception:
        return {}
    out: dict[str, str | None] = {}
    for key, tag in (
        ("camera_make", _EXIF_MAKE),
        ("camera_model", _EXIF_MODEL),
        ("software", _EXIF_SOFTWARE),
    ):
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value.strip("\x00 "):
            out[key] = value.strip("\x00 ")[:_FIELD_MAX]
    return out


class EvidenceMetrics:
    """Counters of what the decode stage found and what it decided, on the worker's registry.

    Created next to :class:`worker.ops.metrics.Metrics` (same registry); :meth:`observe` takes the decisions
    of a batch after they are written.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.found = Counter(
            "moderation_provenance_found",
            "Images by what their bytes declare: credential state, XMP source type, EXIF camera, PDQ hash.",
            ["what"],
            registry=registry,
        )
        self.rules = Counter(
            "moderation_provenance_rules", "Verdicts set by a provenance rule.", ["rule"], registry=registry
        )
        self.reused = Counter(
            "moderation_duplicate_reuses",
            "Near-duplicates decided from an earlier decision, by whose: moderator or model.",
            ["matched"],
            registry=registry,
        )

    def observe(self, decisions: Iterable[Decision]) -> None:
        for d in decisions:
            p = d.provenance
            if p is not None:
                for what in found_kinds(p):
                    self.found.labels(what).inc()
            if d.source == "provenance" and d.detail:
                self.rules.labels(d.detail).inc()
            if d.matched_event is not None:
                self.reused.labels(
                    "moderator" if d.matched_event.source.startswith("moderator") else "model"
                ).inc()


def found_kinds(p: Provenance) -> list[str]:
    """The label values one record counts under."""
    kinds = [] if p.credential == CredentialState.ABSENT else [f"credential_{p.credential.value}"]
    if p.xmp_source_type:
        kinds.append("xmp_source_type")
    if p.camera_make or p.camera_model:
        kinds.append("exif_camera")
    if p.declared_ai:
        kinds.append("declared_ai")
    if p.proven_ai:
        kinds.append("proven_ai")
    if p.pdq:
        kinds.append("pdq_hash")
    return kinds
