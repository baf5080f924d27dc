"""Safe decode: untrusted bytes to an RGB image in display orientation, or a typed :class:`DecodeError`.

The pixel cap is checked from the header before any pixel is decoded, so a decompression bomb costs a few
kilobytes of memory. We never touch Pillow's process-wide knobs (``MAX_IMAGE_PIXELS``,
``LOAD_TRUNCATED_IMAGES``): a library must not change its host's behaviour at import.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def decode_image(data: bytes, *, max_pixels: int, allowed_formats: Sequence[str]) -> Image.Image:
    """Decode to RGB (first frame, EXIF orientation applied); raise :class:`DecodeError` otherwise."""
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise DecodeError(ErrorReason.TOO_MANY_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, EOFError, ValueError, IndexError, TypeError) as exc:
        message = str(exc)
        if "truncat" in message.lower() or isinstance(exc, EOFError) or "broken data stream" in message:
            raise DecodeError(ErrorReason.TRUNCATED_IMAGE, message) from exc
        raise DecodeError(ErrorReason.CORRUPT_IMAGE, message) from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB without resampling; high bit depths are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # Alpha is dropped, not composited: compositing would rewrite the very pixels the detector reads.
    return img.convert("RGB")
