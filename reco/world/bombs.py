"""Image bombs for the hostile endpoints: PNGs that are tiny on the wire and huge decoded.

* :func:`pixel_bomb`: 30000 x 30000 1-bit grey (900 M pixels; decoders refuse it by pixel count);
* :func:`bpp_bomb`: 7999 x 7999 16-bit RGBA (64 M pixels, just under OpenCV's pixel cap, but
  8 bytes per pixel: 512 MB decoded and several GB in img2dataset's alpha blending).

Both are all-zero images compressed once per process (~1 s): rows are deflated in blocks ended
by a full flush, so one compressed block repeats, and the zlib checksum is computed alongside.
"""
from __future__ import annotations

import functools
import io
import struct
import threading
import zlib

import numpy as np
from PIL import Image

PIXEL_BOMB = (30000, 1, 0)          # side, bit depth, PNG colour type (0: grey)
BPP_BOMB = (7999, 16, 6)            # 6: RGBA
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_LOCK = threading.Lock()


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk (length, type, data, CRC)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=1)
def valid_png() -> bytes:
    """A small valid 32 x 32 RGB PNG."""
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _zeros_zlib(row_bytes: int, rows: int, block: int = 64) -> bytes:
    """zlib stream of ``rows`` all-zero rows of ``row_bytes`` bytes (filter byte included)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    unit_raw = b"\x00" * (row_bytes * block)
    unit = comp.compress(unit_raw) + comp.flush(zlib.Z_FULL_FLUSH)   # state reset: repeatable
    full, rest = divmod(rows, block)
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(unit_raw, adler)
    tail_raw = b"\x00" * (row_bytes * rest)
    adler = zlib.adler32(tail_raw, adler)
    tail = comp.compress(tail_raw) + comp.flush()
    return b"\x78\xda" + unit * full + tail + struct.pack(">I", adler & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def png_bomb(side: int, bit_depth: int, colour_type: int) -> bytes:
    """An all-zero ``side`` x ``side`` PNG of the given bit depth and colour type."""
    row_bytes = 1 + (side * _CHANNELS[colour_type] * bit_depth + 7) // 8
    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", _zeros_zlib(row_bytes, side))
            + chunk(b"IEND", b""))


def pixel_bomb() -> bytes:
    with _LOCK:                      # computed once even under concurrent requests
        return png_bomb(*PIXEL_BOMB)


def bpp_bomb() -> bytes:
    with _LOCK:
        return png_bomb(*BPP_BOMB)
