"""Hostile but under-cap images: tiny files that decode to large, deep sample arrays."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png16(width: int, height: int, *, color: bool = False) -> bytes:
    """A 16-bit grayscale (or RGB) PNG of ``width`` x ``height`` that compresses to a few kilobytes.

    Written chunk by chunk with a streaming compressor, so building a 7000 x 7000 one costs no more memory
    here than one row.
    """
    channels = 3 if color else 1
    row = b"\x00" + (np.arange(width * channels, dtype=">u2") * 7).tobytes()
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2 if color else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tiff_float(width: int, height: int) -> bytes:
    arr = np.linspace(-5.0, 5.0, width * height, dtype=np.float32).reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()
