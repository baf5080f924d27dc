"""Safe decode: untrusted bytes to an RGB image in display orientation, or a typed :class:`DecodeError`.

The pixel cap is checked from the header before any pixel is decoded, so a decompression bomb costs a few
kilobytes of memory. Pixels alone do not bound memory (a 95 KB 16-bit PNG of 49 megapixels needs its samples
stored, converted and copied), so the bytes a decode will need are estimated from the header too (pixels x
bytes per stored pixel x working copies, :func:`decode_bytes`) and reserved from a per-process
:class:`DecodeBudget` before decoding: one image over the budget is refused at once, and concurrent decodes
together never hold more than it. Conversions run in row blocks, never widening a whole image to float64.
We never touch Pillow's process-wide knobs (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``): a library
must not change its host's behaviour at import.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from worker.errors import DecodeError, ErrorReason

# Non-raster formats recognised by their first bytes: reported as unsupported, not as garbage.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"PK\x03\x04", "ZIP"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


def _sniff_foreign(data: bytes) -> str | None:
    """Name a format we will not decode: one Pillow knows but is not allowed, or a known non-raster one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:  # header only; pixels are never decoded here
                return str(other.format)
    except Exception:
        pass
    head = data[:64].lstrip()
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return name
    if b"<svg" in data[:1024].lower():
        return "SVG"
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "ISO media")
    return None


# Bytes Pillow stores per pixel, by mode (multi-band modes are stored 4 bytes per pixel, RGB included).
_STORED_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Bytes per pixel alive at the peak of :func:`to_rgb`, source included (see its branches): deep gray keeps
# source + 8-bit plane + L image + RGB result; I/F also their 4-byte sample copy while reducing; a palette
# with transparency goes through RGBA. Every other mode: source + RGB result.
_CONVERT_PEAK_BPP = {"RGB": 4, "I;16": 8, "I;16B": 8, "I;16L": 8, "I;16N": 8, "I": 10, "F": 10, "P": 9}
_BLOCK_ROWS = 256
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_bytes(width: int, height: int, mode: str, *, transposed: bool = False) -> int:
    """Memory a decode of this header needs at its peak: source samples, conversion copies, the RGB result
    and, for EXIF-rotated images, the rotated copy."""
    convert = _CONVERT_PEAK_BPP.get(mode, _STORED_BPP.get(mode, 4) + 4)
    rotate = 8 if transposed else 4  # the RGB result and its rotated copy (the source is gone by then)
    return width * height * max(convert, rotate)


class DecodeBudget:
    """Bytes all concurrent decodes of a process may hold; a decode waits until its estimate fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        if n > self.limit:
            raise DecodeError(ErrorReason.DECODE_TOO_LARGE, f"decode needs ~{n} bytes > budget {self.limit}")
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def shared_budget(limit: int) -> DecodeBudget:
    """The process's budget for ``limit`` (workers, the review page and training share one per limit)."""
    with _budgets_lock:
        budget = _budgets.get(limit)
        if budget is None:
            if not _budgets:
                return_large_buffers()
            budget = _budgets[limit] = DecodeBudget(limit)
        return budget


MMAP_THRESHOLD = 1 << 20


def return_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve buffers above ``threshold`` with mmap, so freeing them returns the memory at once.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which image-sized buffers
    come from per-thread heaps that keep their pages: with four decode threads, RSS then stays near the
    high-water mark of every thread at once, whatever the budget allowed to be live. Measured on the hostile
    soak mix (docs/benchmarks.md): peak RSS 2.0 GB without, 1.35 GB with. Called once, when a process first
    decodes with a budget; honours an operator's ``MALLOC_MMAP_THRESHOLD_`` and is a no-op off glibc.
    """
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def decode_image(
    data: bytes, *, max_pixels: int, allowed_formats: Sequence[str], max_bytes: int | None = None
) -> Image.Image:
    """Decode to RGB (first frame, EXIF orientation applied); raise :class:`DecodeError` otherwise.

    ``max_bytes``: the memory budget (``Settings.max_decode_bytes``); the estimate is checked against it
    before decoding and reserved from the process-wide :func:`shared_budget` while decoding.
    """
    with decoded(data, max_pixels=max_pixels, allowed_formats=allowed_formats, max_bytes=max_bytes) as img:
        return img


@contextmanager
def decoded(
    data: bytes, *, max_pixels: int, allowed_formats: Sequence[str], max_bytes: int | None = None
) -> Iterator[Image.Image]:
    """:func:`decode_image` that keeps its share of the budget until the block ends, so an image being cut
    into crops still counts against the budget (the scoring path uses this)."""
    img, need = _open_checked(data, max_pixels, allowed_formats)
    budget = shared_budget(max_bytes) if max_bytes is not None else None
    with budget.reserve(need) if budget is not None else _no_budget():
        rgb = _decode_opened(img)
        del img
        yield rgb


def _open_checked(data: bytes, max_pixels: int, allowed_formats: Sequence[str]) -> tuple[Image.Image, int]:
    """Open (header only) and check format and pixel cap; returns the image and the bytes it will need."""
    if not data:
        raise DecodeError(ErrorReason.EMPTY_FILE, "zero bytes")
    Image.init()  # registers plugins once; a no-op afterwards
    # MPO (multi-picture JPEG) is opened by the JPEG plugin, so it is allowed through "JPEG".
    allowed = [f.upper() for f in allowed_formats if f.upper() in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=allowed)
    except UnidentifiedImageError as exc:
        foreign = _sniff_foreign(data)
        if foreign is not None:
            raise DecodeError(ErrorReason.UNSUPPORTED_FORMAT, f"{foreign} is not an allowed format") from exc
        raise DecodeError(ErrorReason.NOT_AN_IMAGE, "bytes are not a recognised image") from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(ErrorReason.TOO_MANY_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(ErrorReason.CORRUPT_IMAGE, f"unreadable header: {exc}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(ErrorReason.CORRUPT_IMAGE, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            ErrorReason.TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > cap {max_pixels}"
        )
    # Orientation is only known once EXIF is read, which for some formats (PNG) means decoding: assume the
    # rotated copy is needed.
    return img, decode_bytes(width, height, img.mode, transposed=True)


def _decode_opened(img: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
            orientation = _orientation(img)
            rgb = to_rgb(img)
            del img  # the source samples go before the rotated copy is made
            method = _TRANSPOSE.get(orientation)
            return rgb if method is None else rgb.transpose(method)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(ErrorReason.TOO_MANY_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, EOFError, ValueError, IndexError, TypeError) as exc:
        message = str(exc)
        if "truncat" in message.lower() or isinstance(exc, EOFError) or "broken data stream" in message:
            raise DecodeError(ErrorReason.TRUNCATED_IMAGE, message) from exc
        raise DecodeError(ErrorReason.CORRUPT_IMAGE, message) from exc


@contextmanager
def _no_budget() -> Iterator[None]:
    yield


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable), read from the header only."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB without resampling; high bit depths are scaled, not clipped.

    Deep samples are reduced in blocks of rows, so the only full-size intermediates are the samples (2 or 4
    bytes per pixel) and an 8-bit gray plane, never a float64 copy (8 bytes per pixel) of the image.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        gray = np.empty(arr.shape, dtype=np.uint8)
        if img.mode.startswith("I;16"):
            for r in range(0, arr.shape[0], _BLOCK_ROWS):  # x / 257 rounded: (x + 128) // 257, exact
                gray[r : r + _BLOCK_ROWS] = (arr[r : r + _BLOCK_ROWS].astype(np.uint32) + 128) // 257
        else:
            lo, hi = float(arr.min()), float(arr.max())
            scale = 0.0 if hi <= lo else 255.0 / (hi - lo)
            for r in range(0, arr.shape[0], _BLOCK_ROWS):
                block = (arr[r : r + _BLOCK_ROWS].astype(np.float64) - lo) * scale
                gray[r : r + _BLOCK_ROWS] = np.clip(np.rint(block), 0, 255)
        del arr
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # Alpha is dropped, not composited: compositing would rewrite the very pixels the detector reads.
    return img.convert("RGB")
