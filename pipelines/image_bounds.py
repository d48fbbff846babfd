"""Memory bound per image and per worker for img2dataset's decode + resize.

A pixel cap alone does not bound memory: a 498 KB PNG of 7999 x 7999 16-bit RGBA pixels passes
OpenCV's 64 M pixel cap, decodes to 512 MB, and img2dataset's alpha blending (float64
temporaries) takes it past 5 GB. :func:`decode_cost` reads the image's header (PNG IHDR, or
PIL's lazy ``Image.open`` for other formats; nothing is decoded) and estimates what decoding
and resizing it takes: ``pixels x (channels x bytes per sample + ALPHA_BYTES if it has alpha)``.
:class:`BoundedResizer` (img2dataset's Resizer) refuses an image whose estimate is over
``embed.max_image_mb`` (the row fails with ``failed_to_resize`` and the reason), and makes every
decode of a process take its estimate from one shared :class:`ByteBudget` of
``embed.decode_budget_mb`` first, so all download threads together never decode more than that
at once. An image whose header cannot be read is not decoded. Images with alpha are decoded
and blended here, in bands (same arithmetic and result as img2dataset's), and handed on as
3-channel BMP, so img2dataset's whole-image float64 blend never runs.
"""
from __future__ import annotations

import functools
import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from img2dataset.resizer import Resizer

MB = 1 << 20
# img2dataset blends alpha as ``alpha / 255 * img[..., :3] + 255 - alpha`` in float64 over the
# whole image (~56 bytes per pixel of temporaries); :func:`blend_alpha` does the same arithmetic
# in bands of rows, so an image with alpha costs its decoded planes plus a 3-byte result.
ALPHA_BYTES = 3
BAND_ROWS = 256
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}    # as OpenCV returns them (palette, grey+alpha: BGRA)
_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4, "I;32": 4}


class ImageRefused(ValueError):
    """An image that is not decoded (too large once decoded, or an unreadable header)."""


@dataclass(frozen=True)
class Cost:
    width: int
    height: int
    channels: int
    sample_bytes: int

    @property
    def bytes(self) -> int:
        alpha = ALPHA_BYTES if self.channels == 4 else 0
        return self.width * self.height * (self.channels * self.sample_bytes + alpha)

    def describe(self) -> str:
        return (f"{self.width}x{self.height} pixels, {self.channels} channel(s) of "
                f"{8 * self.sample_bytes} bit")


def decode_cost(data: bytes) -> Cost:
    """Size, channels and sample size of an encoded image, from its header only."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
        if colour not in _PNG_CHANNELS:
            raise ImageRefused(f"PNG colour type {colour} is not valid")
        return Cost(width, height, _PNG_CHANNELS[colour], 2 if depth == 16 else 1)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # PIL's DecompressionBombWarning
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                channels, sample = len(img.getbands()), _SAMPLE_BYTES.get(img.mode, 1)
                if img.mode == "P" or img.format in ("WEBP", "GIF"):
                    channels = 4                         # may decode with alpha
                tags = getattr(img, "tag_v2", None)      # TIFF: the samples as stored
                if tags is not None:
                    bits = tags.get(258, (8,))
                    channels = max(channels, int(tags.get(277, channels)))
                    sample = max(sample, -(-max(bits if isinstance(bits, tuple) else (bits,)) // 8))
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for unreadable headers
        raise ImageRefused(f"Image decoding refused: unreadable image header ({exc})") from exc
    return Cost(width, height, channels, sample)


class ByteBudget:
    """A counting semaphore in bytes: :meth:`take` waits until ``n`` bytes are free."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@functools.lru_cache(maxsize=None)
def budget(total_bytes: int) -> ByteBudget:
    """The process's decode budget of this size (shared by every thread and shard)."""
    return ByteBudget(total_bytes)


class BoundedResizer(Resizer):
    """img2dataset's Resizer that decodes only images whose estimated memory fits both bounds."""

    def __init__(self, *args, max_image_bytes: int, budget_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_image_bytes = int(max_image_bytes)
        self.budget_bytes = int(budget_bytes)

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            need = self.check(img_stream.getvalue() if hasattr(img_stream, "getvalue") else img_stream.read())
        except ImageRefused as exc:
            return None, None, None, None, None, str(exc)
        shared = budget(self.budget_bytes)
        shared.take(need)
        try:
            img_stream.seek(0)
            return super().__call__(_without_alpha(img_stream), blurring_bbox_list)
        except ImageRefused as exc:
            return None, None, None, None, None, str(exc)
        finally:
            shared.give(need)

    def check(self, data: bytes) -> int:
        """Bytes to reserve for decoding ``data``; :class:`ImageRefused` over the bound."""
        cost = decode_cost(data)
        pixel_cap = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
        if cost.width * cost.height > pixel_cap:          # what OpenCV would refuse, said first
            raise ImageRefused(f"Image decoding refused: {cost.describe()}, over the pixel cap "
                               f"CV_IO_MAX_IMAGE_PIXELS={pixel_cap}")
        limit = min(self.max_image_bytes, self.budget_bytes)
        if cost.bytes > limit:
            raise ImageRefused(f"Image decoding refused: {cost.describe()} needs about "
                               f"{cost.bytes / MB:.0f} MB to decode, over the {limit / MB:.0f} MB "
                               f"per image (embed.max_image_mb / embed.decode_budget_mb)")
        return max(cost.bytes, 1)


def blend_alpha(img: np.ndarray) -> np.ndarray:
    """img2dataset's alpha blend (onto white, uint8 result), computed in bands of rows."""
    out = np.empty(img.shape[:2] + (3,), np.uint8)
    for r in range(0, img.shape[0], BAND_ROWS):
        band = img[r:r + BAND_ROWS]
        alpha = band[:, :, 3, np.newaxis]
        mixed = alpha / 255 * band[..., :3] + 255 - alpha
        out[r:r + BAND_ROWS] = np.rint(mixed.clip(min=0, max=255)).astype(np.uint8)
    return out


def _without_alpha(img_stream):
    """``img_stream``, or the blended image as a BMP stream when it decodes with 4 channels."""
    data = img_stream.read()
    img_stream.seek(0)
    if decode_cost(data).channels != 4:
        return img_stream
    cv2.setNumThreads(1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageRefused("Image decoding error")
    if img.ndim != 3 or img.shape[-1] != 4:
        return img_stream
    rgb = blend_alpha(img)
    del img
    return io.BytesIO(cv2.imencode(".bmp", rgb)[1].tobytes())
