"""Local image files, read only from allow-listed folders, only as regular files, with a timeout.

An event names its image, and the producer is not trusted with the worker host's file system: a path outside
the configured roots is ``forbidden_source`` before the file system is touched, so an error never tells the
producer whether ``~/.ssh/id_rsa`` exists. Inside a root, symlinks are resolved and the target must still lie
inside one; the file is opened without blocking and without following a last-moment symlink, and anything
that is not a regular file (a FIFO, a device, a directory) is refused before a byte is read. The read runs on
a daemon thread so a hung mount costs one thread, not the worker's drain. Error details name no host path:
they end up on the review page.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import ErrorReason, FetchError

MAX_PATH = 4096
MAX_NAME = 255
_READERS = 4


class _DaemonReaders:
    """A few daemon threads for blocking reads: unlike ThreadPoolExecutor's, a stuck one never blocks exit."""

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], bytes], Future[bytes]]] = queue.SimpleQueue()
        self._n = n
        self._started = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], bytes]) -> Future[bytes]:
        with self._lock:
            if not self._started:
                for i in range(self._n):
                    threading.Thread(target=self._run, name=f"local-read-{i}", daemon=True).start()
                self._started = True
        fut: Future[bytes] = Future()
        self._jobs.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)


_readers: _DaemonReaders | None = None
_readers_lock = threading.Lock()


def _shared_readers() -> _DaemonReaders:
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = _DaemonReaders(_READERS)
        return _readers


def path_of(uri: str) -> str:
    """The file system path a ``file://`` URI or a plain path names."""
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(ErrorReason.FORBIDDEN_SOURCE, "file:// URIs must not name a host")
        return unquote(parts.path)
    return uri


class LocalFiles:
    """Reads local images under ``roots`` (folders, or single files a trusted caller named)."""

    def __init__(self, roots: Iterable[str | Path], *, max_bytes: int, timeout_s: float) -> None:
        self.roots = [self._root(r) for r in roots if "\x00" not in str(r)]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    @staticmethod
    def _root(root: str | Path) -> tuple[str, str]:
        """(as written, made absolute; symlinks resolved), both normalised."""
        lexical = os.path.abspath(os.path.expanduser(str(root)))
        return lexical, os.path.realpath(lexical)

    @property
    def enabled(self) -> bool:
        return bool(self.roots)

    def read(self, uri: str) -> bytes:
        path = path_of(uri)
        if not self.roots:
            raise FetchError(
                ErrorReason.FORBIDDEN_SOURCE,
                "local files are disabled on this worker (set MODERATION_LOCAL_ROOTS to allow folders)",
            )
        if "\x00" in path:
            raise FetchError(ErrorReason.INVALID_PATH, "the path contains a NUL byte")
        try:
            too_long = len(path) > MAX_PATH or any(len(os.fsencode(p)) > MAX_NAME for p in path.split("/"))
        except UnicodeError as exc:
            raise FetchError(ErrorReason.INVALID_PATH, "the path is not valid text") from exc
        if too_long:
            raise FetchError(ErrorReason.INVALID_PATH, "the path or one of its names is too long")
        lexical = os.path.abspath(os.path.expanduser(path))
        if not any(_inside(lexical, root) for root, _ in self.roots):
            raise FetchError(ErrorReason.FORBIDDEN_SOURCE, "the path is outside the allowed local roots")
        try:
            real = os.path.realpath(lexical, strict=True)
        except OSError as exc:
            raise _os_error(exc) from exc
        if not any(_inside(real, resolved) for _, resolved in self.roots):
            raise FetchError(ErrorReason.FORBIDDEN_SOURCE, "a symlink leads outside the allowed local roots")
        future = _shared_readers().submit(lambda: self._read_regular(real))
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout as exc:
            raise FetchError(
                ErrorReason.FETCH_TIMEOUT, f"local read took longer than {self.timeout_s}s", transient=True
            ) from exc
        except OSError as exc:
            raise _os_error(exc) from exc

    def _read_regular(self, real: str) -> bytes:
        # O_NONBLOCK: opening a FIFO never waits for a writer; O_NOFOLLOW: the name resolved above cannot be
        # swapped for a symlink between the check and the open.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(ErrorReason.NOT_A_REGULAR_FILE, f"not a regular file ({_kind(st.st_mode)})")
            if st.st_size > self.max_bytes:
                raise FetchError(ErrorReason.TOO_MANY_BYTES, f"{st.st_size} bytes > cap {self.max_bytes}")
            os.set_blocking(fd, True)
            chunks: list[bytes] = []
            total = 0
            while total <= self.max_bytes:
                chunk = os.read(fd, min(1 << 20, self.max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        finally:
            os.close(fd)
        if total > self.max_bytes:
            raise FetchError(ErrorReason.TOO_MANY_BYTES, f"file grew past cap {self.max_bytes}")
        return b"".join(chunks)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def _os_error(exc: OSError) -> FetchError:
    """An OSError as a typed reason, without the path the OS put in its message."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return FetchError(ErrorReason.FILE_NOT_FOUND, "no such file")
    if code == errno.EISDIR:
        return FetchError(ErrorReason.NOT_A_REGULAR_FILE, "not a regular file (directory)")
    if code == errno.ELOOP:
        return FetchError(ErrorReason.SYMLINK_LOOP, "too many levels of symbolic links")
    if code == errno.ENAMETOOLONG:
        return FetchError(ErrorReason.INVALID_PATH, "the path or one of its names is too long")
    if code in (errno.EACCES, errno.EPERM):
        return FetchError(ErrorReason.FORBIDDEN_SOURCE, "permission denied")
    if code in (errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT):
        return FetchError(
            ErrorReason.READ_ERROR, f"I/O error ({errno.errorcode.get(code, code)})", transient=True
        )
    return FetchError(ErrorReason.READ_ERROR, f"cannot read ({errno.errorcode.get(code or 0, code)})")
