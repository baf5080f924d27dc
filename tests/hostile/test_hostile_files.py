"""Local files as image sources: off by default, allow-listed roots only, regular files only, typed reasons.

Real files, real FIFOs, real symlinks, real EIO (``/proc/self/mem`` answers every read at offset 0 with it).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.core.images import jpeg
from worker.errors import ErrorReason, FetchError
from worker.media.fetch import Fetcher
from worker.settings import Settings


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    r.mkdir()
    (r / "ok.jpg").write_bytes(jpeg(64, 48))
    return r


def fetcher(tmp_path: Path, *roots: Path | str, **kw: object) -> Fetcher:
    return Fetcher(
        Settings(home=tmp_path / "home", local_roots=[str(r) for r in roots], fetch_retries=0, **kw)  # type: ignore[arg-type]
    )


def reason_of(f: Fetcher, uri: str) -> tuple[ErrorReason, str]:
    with pytest.raises(FetchError) as info:
        f.fetch(uri)
    return info.value.reason, info.value.detail


def test_local_files_are_off_by_default(tmp_path: Path, root: Path) -> None:
    assert Settings(_env_file=None, local_roots=[]).local_roots == []
    f = fetcher(tmp_path)
    for uri in (str(root / "ok.jpg"), f"file://{root / 'ok.jpg'}"):
        assert reason_of(f, uri)[0] == ErrorReason.FORBIDDEN_SOURCE


def test_roots_allow_files_inside_them_only(tmp_path: Path, root: Path) -> None:
    f = fetcher(tmp_path, root)
    assert f.fetch(str(root / "ok.jpg")) == (root / "ok.jpg").read_bytes()
    assert f.fetch(f"file://{root / 'ok.jpg'}") == (root / "ok.jpg").read_bytes()
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    for uri in (str(outside), f"{root}/../secret.jpg", f"file://{root}/%2e%2e/secret.jpg", "/etc/passwd"):
        assert reason_of(f, uri)[0] == ErrorReason.FORBIDDEN_SOURCE, uri
    # A sibling whose name starts with the root's is not inside it.
    sibling = tmp_path / "images2"
    sibling.mkdir()
    (sibling / "x.jpg").write_bytes(b"x")
    assert reason_of(f, str(sibling / "x.jpg"))[0] == ErrorReason.FORBIDDEN_SOURCE


def test_existence_outside_the_roots_is_not_revealed(tmp_path: Path, root: Path) -> None:
    f = fetcher(tmp_path, root)
    existing = reason_of(f, str(Path.home() / ".bashrc"))
    missing = reason_of(f, str(Path.home() / ".no-such-file-here"))
    assert existing[0] == missing[0] == ErrorReason.FORBIDDEN_SOURCE
    assert existing[1] == missing[1]


def test_symlinks_are_resolved_and_checked(tmp_path: Path, root: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(32, 32))
    (root / "escape.jpg").symlink_to(secret)
    (root / "inside.jpg").symlink_to(root / "ok.jpg")
    (root / "dir-escape").symlink_to(tmp_path)
    f = fetcher(tmp_path, root)
    assert reason_of(f, str(root / "escape.jpg")) == (
        ErrorReason.FORBIDDEN_SOURCE,
        "a symlink leads outside the allowed local roots",
    )
    assert reason_of(f, str(root / "dir-escape" / "secret.jpg"))[0] == ErrorReason.FORBIDDEN_SOURCE
    assert f.fetch(str(root / "inside.jpg")) == (root / "ok.jpg").read_bytes()


def test_a_symlinked_root_is_followed(tmp_path: Path, root: Path) -> None:
    link = tmp_path / "link-to-images"
    link.symlink_to(root)
    f = fetcher(tmp_path, link)
    assert f.fetch(str(link / "ok.jpg")) == (root / "ok.jpg").read_bytes()


def test_fifo_device_and_directory_are_refused_without_blocking(tmp_path: Path, root: Path) -> None:
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    (root / "sub").mkdir()
    f = fetcher(tmp_path, root, "/dev")
    done = threading.Event()
    results: list[tuple[ErrorReason, str]] = []

    def run() -> None:
        results.append(reason_of(f, str(fifo)))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20), "reading a FIFO blocked"
    assert results[0] == (ErrorReason.NOT_A_REGULAR_FILE, "not a regular file (named pipe)")
    assert reason_of(f, "/dev/zero") == (
        ErrorReason.NOT_A_REGULAR_FILE,
        "not a regular file (character device)",
    )
    assert reason_of(f, str(root / "sub"))[0] == ErrorReason.NOT_A_REGULAR_FILE


def test_typed_reasons_for_broken_paths(tmp_path: Path, root: Path) -> None:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    f = fetcher(tmp_path, root, "/proc")
    cases = {
        str(root / "loop-a"): ErrorReason.SYMLINK_LOOP,
        str(root / "nul\x00.jpg"): ErrorReason.INVALID_PATH,
        f"file://{root}/nul%00.jpg": ErrorReason.INVALID_PATH,
        str(root / ("n" * 300)): ErrorReason.INVALID_PATH,
        str(root) + "/a" * 3000: ErrorReason.INVALID_PATH,
        str(root / "missing.jpg"): ErrorReason.FILE_NOT_FOUND,
        str(root / "ok.jpg" / "below"): ErrorReason.FILE_NOT_FOUND,
        "/proc/self/mem": ErrorReason.READ_ERROR,  # EIO on every read at offset 0
        "file://otherhost/etc/passwd": ErrorReason.FORBIDDEN_SOURCE,
    }
    for uri, want in cases.items():
        got, detail = reason_of(f, uri)
        assert got == want, (uri[:80], got, detail)
        assert str(root) not in detail and str(tmp_path) not in detail  # no host path echoed


def test_size_cap_applies_to_local_files(tmp_path: Path, root: Path) -> None:
    (root / "big.jpg").write_bytes(b"\xff" * 5000)
    f = fetcher(tmp_path, root, max_bytes=4096)
    assert reason_of(f, str(root / "big.jpg"))[0] == ErrorReason.TOO_MANY_BYTES


def test_roots_from_the_environment_accept_commas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODERATION_LOCAL_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    assert Settings().local_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("MODERATION_LOCAL_ROOTS", f'["{tmp_path}/c"]')
    assert Settings().local_roots == [tmp_path / "c"]
    monkeypatch.setenv("MODERATION_LOCAL_ROOTS", "")
    assert Settings().local_roots == []


def test_the_cli_reads_the_files_its_user_named_even_with_local_files_off(
    tmp_path: Path, root: Path, tiny_checkpoint: Path
) -> None:
    import json

    from tests.conftest import run_cli

    out = run_cli(
        "score",
        "--checkpoint",
        str(tiny_checkpoint),
        "--json",
        str(root / "ok.jpg"),
        f"file://{root / 'ok.jpg'}",
        str(root / "missing.jpg"),
        MODERATION_LOCAL_ROOTS="",
        MODERATION_DEVICE="cpu",
        MODERATION_HOME=str(tmp_path / "home"),
    )
    assert out.returncode == 1, out.stderr  # one input failed: score says so in its exit status
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["verdict"] != "error" for d in got] == [True, True, False]
    assert got[2]["reason"] == "file_not_found"
