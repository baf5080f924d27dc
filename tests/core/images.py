"""Builders of real image files in every awkward shape the decoder must handle."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(w: int = 320, h: int = 240, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(w, h, seed)), "JPEG", quality=90)


def png(w: int = 320, h: int = 240, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(w, h, seed)), "PNG")


def png_bomb(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height grayscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def every_mode() -> dict[str, bytes]:
    """One file per awkward mode/format combination, all at least 80x80."""
    rgb = Image.fromarray(noise(120, 90, 1))
    out = {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "cmyk.tiff": encode(rgb.convert("CMYK"), "TIFF"),
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent.png": encode(
            rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0
        ),
        "la.png": encode(rgb.convert("LA"), "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "rgba.webp": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "bilevel.png": encode(rgb.convert("1"), "PNG"),
        "gray16.png": encode(
            Image.fromarray((np.arange(120 * 90, dtype=np.uint16).reshape(90, 120) * 7).astype(np.uint16)),
            "PNG",
        ),
        "rgb.bmp": encode(rgb, "BMP"),
    }
    frames = [Image.fromarray(noise(100, 100, s)).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["animated.gif"] = buf.getvalue()
    return out
