"""Turn an image reference into bytes, with a byte cap and timeouts on every path.

Permanent failures (missing, forbidden, disallowed host) raise non-transient :class:`FetchError` so the caller
decides ``error`` at once; network hiccups raise transient ones, retried here with backoff before giving up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from worker.errors import ErrorReason, FetchError
from worker.media.local import LocalFiles
from worker.media.s3 import S3Uri, make_client

if TYPE_CHECKING:
    from worker.settings import Settings

_CHUNK = 1 << 16


class Fetcher:
    """Holds the clients (S3, HTTP) so they are built once per process, not per image."""

    def __init__(self, settings: Settings, *, extra_local: Iterable[str | Path] = ()) -> None:
        """``extra_local``: files or folders a trusted caller named itself (the CLI's arguments), allowed on
        top of ``settings.local_roots``."""
        self.settings = settings
        self.local = LocalFiles(
            [*settings.local_roots, *extra_local],
            max_bytes=settings.max_bytes,
            timeout_s=settings.local_read_timeout_s,
        )
        self._s3: Any = None
        self._http: Any = None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = make_client(self.settings)
        return self._s3

    @property
    def http(self) -> Any:
        if self._http is None:
            import httpx

            timeout = httpx.Timeout(self.settings.read_timeout_s, connect=self.settings.connect_timeout_s)
            self._http = httpx.Client(timeout=timeout, follow_redirects=False)
        return self._http

    def fetch(self, uri: str) -> bytes:
        attempt = 0
        while True:
            try:
                return self._fetch_once(uri)
            except FetchError as exc:
                if not exc.transient or attempt >= self.settings.fetch_retries:
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))
                attempt += 1

    def _fetch_once(self, uri: str) -> bytes:
        scheme = urlsplit(uri).scheme.lower()
        if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] == ":\\"):
            return self._fetch_file(uri)
        if scheme == "s3":
            return self._fetch_s3(uri)
        if scheme == "https":
            return self._fetch_https(uri)
        raise FetchError(ErrorReason.UNSUPPORTED_URI, f"scheme {scheme!r} is not supported: {uri[:200]}")

    def _fetch_file(self, uri: str) -> bytes:
        return self.local.read(uri)

    def _fetch_s3(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        loc = S3Uri.parse(uri)
        try:
            obj = self.s3.get_object(Bucket=loc.bucket, Key=loc.key)
            length = int(obj.get("ContentLength") or 0)
            if length > self.settings.max_bytes:
                obj["Body"].close()
                raise FetchError(
                    ErrorReason.TOO_MANY_BYTES, f"{length} bytes > cap {self.settings.max_bytes}"
                )
            data = obj["Body"].read(self.settings.max_bytes + 1)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                raise FetchError(ErrorReason.S3_OBJECT_NOT_FOUND, f"{uri}: {code}") from exc
            if code in ("AccessDenied", "403", "Forbidden"):
                raise FetchError(ErrorReason.S3_ACCESS_DENIED, f"{uri}: {code}") from exc
            raise FetchError(ErrorReason.FETCH_FAILED, f"{uri}: {code}", transient=status >= 500) from exc
        except BotoCoreError as exc:
            raise FetchError(ErrorReason.FETCH_FAILED, f"{uri}: {exc}", transient=True) from exc
        if len(data) > self.settings.max_bytes:
            raise FetchError(ErrorReason.TOO_MANY_BYTES, f"object larger than cap {self.settings.max_bytes}")
        return bytes(data)

    def _fetch_https(self, uri: str) -> bytes:
        import httpx

        host = (urlsplit(uri).hostname or "").lower()
        allowed = {h.lower() for h in self.settings.https_allow_hosts}
        if host not in allowed:
            raise FetchError(ErrorReason.HOST_NOT_ALLOWED, f"host {host!r} is not in the allow-list")
        try:
            with self.http.stream("GET", uri) as resp:
                if resp.status_code in (404, 410):
                    raise FetchError(ErrorReason.HTTP_NOT_FOUND, f"{uri}: HTTP {resp.status_code}")
                if resp.status_code in (401, 403):
                    raise FetchError(ErrorReason.HTTP_FORBIDDEN, f"{uri}: HTTP {resp.status_code}")
                if resp.status_code != 200:
                    raise FetchError(
                        ErrorReason.HTTP_ERROR,
                        f"{uri}: HTTP {resp.status_code}",
                        transient=resp.status_code >= 500 or resp.status_code == 429,
                    )
                buf = bytearray()
                for chunk in resp.iter_bytes(_CHUNK):
                    buf += chunk
                    if len(buf) > self.settings.max_bytes:
                        raise FetchError(
                            ErrorReason.TOO_MANY_BYTES, f"body exceeds {self.settings.max_bytes}"
                        )
                return bytes(buf)
        except httpx.TimeoutException as exc:
            raise FetchError(ErrorReason.FETCH_TIMEOUT, f"{uri}: {exc}", transient=True) from exc
        except httpx.HTTPError as exc:
            raise FetchError(ErrorReason.FETCH_FAILED, f"{uri}: {exc}", transient=True) from exc

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
