"""Batched JPEG decode on the model's device (nvJPEG on CUDA), for the images where it gives Pillow's pixels.

At 1 megapixel Pillow decodes about 130 images/s per core and one process reaches about 550/s (the GIL), far
below what one GPU scores; nvJPEG decodes thousands per second. So on CUDA a worker reads only the
JPEG *header* on its decode threads (:func:`plan`: format, mode, size, pixel cap, EXIF orientation, crop
boxes), and the model thread decodes the whole batch in one ``torchvision.io.decode_jpeg`` call, cuts the
native crops on the GPU (:func:`worker.media.crops.crop_tensor`) and feeds them to the model without a host
copy.

Everything else takes the Pillow path unchanged: other formats, CMYK and other modes, images smaller than the
window (they need the one upscale :mod:`worker.media.crops` does), files that do not end in an EOI marker
(Pillow reports them as truncated), and any JPEG the device decoder refuses, which is re-decoded by Pillow
from the same bytes so its decision (or typed error) is exactly what the Pillow path gives. On the CPU,
torchvision and Pillow both use libjpeg-turbo and give identical pixels (tested); nvJPEG may differ by a level
or two (the ``gpu`` tests measure the difference on a CUDA host).

torchvision marks its image codecs deprecated from 0.29 in favour of TorchCodec; the whole dependency is this
module, so moving to TorchCodec's decoder later touches nothing else.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from worker.media.crops import CropSpec, crop_tensor, inference_boxes
from worker.records import Box

_ORIENTATION_TAG = 0x0112
_EOI = b"\xff\xd9"


@dataclass
class Pending:
    """A JPEG whose pixels are decoded later, with its batch, on the model's device."""

    data: bytes
    size: tuple[int, int]  # display orientation, as Pillow's exif_transpose gives it
    stored: tuple[int, int]  # as the decoder returns it
    orientation: int
    boxes: list[Box]
    spec: CropSpec
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def pixels(self) -> int:
        return self.stored[0] * self.stored[1]


def plan(data: bytes, spec: CropSpec, *, max_pixels: int, allowed_formats: Sequence[str]) -> Pending | None:
    """Read the header only; a :class:`Pending` when the device decoder can give Pillow's pixels, else None.

    None is not an error: the caller decodes with Pillow, which also produces every typed error.
    """
    if "JPEG" not in {f.upper() for f in allowed_formats} or not data[-64:].rstrip(b"\x00").endswith(_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L") or getattr(img, "n_frames", 1) != 1:
                    return None
                w, h = img.size
                orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # unreadable header: Pillow's path names the reason
        return None
    if w <= 0 or h <= 0 or w * h > max_pixels:
        return None
    if orientation not in range(1, 9):
        orientation = 1  # exif_transpose leaves unknown values alone
    display = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if display[0] < spec.size or display[1] < spec.size:
        return None
    return Pending(data, display, (w, h), orientation, inference_boxes(*display, spec), spec)


def available() -> bool:
    """Whether this torchvision has the JPEG decoder (it may be built without its image extension)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


class JpegDecoder:
    """Decodes :class:`Pending` images in batches on one device and cuts their crops there."""

    def __init__(self, device: torch.device | str, batch_pixels: int) -> None:
        self.device = torch.device(device)
        self.batch_pixels = max(1, batch_pixels)

    def crops(self, items: Sequence[Pending]) -> list[torch.Tensor | Exception]:
        """K x S x S x 3 uint8 crops on the device for each item, or the exception that item raised.

        One call per chunk of at most ``batch_pixels`` pixels (bounds device memory on huge images); a chunk
        that fails (torchvision returns no partial results) is retried image by image, so one bad file never
        costs its neighbours their fast path.
        """
        out: list[torch.Tensor | Exception] = []
        for chunk in self._chunks(items):
            try:
                images = self._decode([p.data for p in chunk])
            except Exception:
                out.extend(self._one_by_one(chunk))
                continue
            for p, img in zip(chunk, images, strict=True):
                out.append(self._cut(p, img))
        return out

    def _chunks(self, items: Sequence[Pending]) -> list[list[Pending]]:
        chunks: list[list[Pending]] = []
        pixels = 0
        for p in items:
            if not chunks or pixels + p.pixels > self.batch_pixels:
                chunks.append([])
                pixels = 0
            chunks[-1].append(p)
            pixels += p.pixels
        return chunks

    def _one_by_one(self, chunk: Sequence[Pending]) -> list[torch.Tensor | Exception]:
        out: list[torch.Tensor | Exception] = []
        for p in chunk:
            try:
                out.append(self._cut(p, self._decode([p.data])[0]))
            except Exception as exc:
                out.append(exc)
        return out

    def _decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+: see the module docstring
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        return list(decoded) if isinstance(decoded, list) else [decoded]

    @staticmethod
    def _cut(p: Pending, chw: torch.Tensor) -> torch.Tensor | Exception:
        if tuple(chw.shape) != (3, p.stored[1], p.stored[0]):
            return ValueError(f"decoder gave {tuple(chw.shape)}, header says {p.stored[0]}x{p.stored[1]}")
        hwc = chw.permute(1, 2, 0)
        return torch.stack([crop_tensor(hwc, b, p.orientation) for b in p.boxes])
