"""The embed stage's decode pool (issue 21): ``embed.decode_workers`` threads decode, preprocess
and tokenise a batch ahead of the forward; the output equals the serial path's exactly."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from reco.clip import load_clip
from reco.pipelines import embed as embed_mod
from reco.pipelines.download import IMAGE_KEY
from reco.pipelines.embed import embed_rows

BATCH = 4


@pytest.fixture(scope="module")
def clip(embed_model):
    return load_clip(embed_model)


def _png(seed: int, side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A PNG whose header says 10000 x 7000 pixels (more than embed.MAX_PIXELS); its data is a
    stub: the decoder must refuse it from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 10000, 7000, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def rows():
    out = [{"id": i, "url": f"u{i}", "caption": f"thing {i}", "label": None, "status": "success",
            "error_message": None, IMAGE_KEY: _png(i, 24 + i)} for i in range(23)]
    out[3][IMAGE_KEY] = b"garbage"                                      # not an image
    out[8][IMAGE_KEY] = _png(8, 40)[:200]                               # truncated
    out[11][IMAGE_KEY] = _bomb()                                        # decompression bomb
    out[5] = {**out[5], "status": "failed_to_download", "error_message": "404"}
    del out[5][IMAGE_KEY]
    out[13]["caption"] = None
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y), (x["id"], sorted(x), sorted(y))
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), (x["id"], key)
            else:
                assert x[key] == y[key], (x["id"], key, x[key], y[key])


def test_parallel_decode_equals_serial_exactly(clip, rows):
    serial = embed_rows(clip, rows, BATCH, decode_workers=0)
    _same(serial, embed_rows(clip, rows, BATCH, decode_workers=1))
    for workers in (2, 5):
        _same(serial, embed_rows(clip, rows, BATCH, decode_workers=workers))
    assert all(IMAGE_KEY not in r for r in serial)
    failed = {r["id"]: r["error_message"] for r in serial if r["status"] == "failed_to_embed"}
    assert sorted(failed) == [3, 8, 11] and all(m.startswith("cannot decode image") for m in failed.values())
    assert "decompression bomb" in failed[11]
    assert serial[5]["status"] == "failed_to_download" and "image_emb" not in serial[5]
    good = [r for r in serial if r["status"] == "success"]
    assert len(good) == 19 and all(r["image_emb"].shape == (64,) for r in good)


def test_decode_runs_in_the_pool_a_batch_ahead_of_the_forward(clip, rows, monkeypatch):
    """Decoding happens in the pool's threads, and the first forward starts before the last
    image is decoded (the shard is not decoded whole first)."""
    events, lock = [], threading.Lock()
    decode, encode = embed_mod.decode, __import__("reco.clip", fromlist=["x"]).encode_images

    def spy_decode(c, data):
        with lock:
            events.append(("decode", threading.current_thread().name))
        return decode(c, data)

    def spy_encode(c, pixels):
        with lock:
            events.append(("forward", threading.current_thread().name))
        return encode(c, pixels)

    monkeypatch.setattr(embed_mod, "decode", spy_decode)
    monkeypatch.setattr("reco.clip.encode_images", spy_encode)
    out = embed_rows(clip, rows, BATCH, decode_workers=3)
    assert sum(r["status"] == "success" for r in out) == 19
    decodes = [name for kind, name in events if kind == "decode"]
    assert len(decodes) == 22 and all(name.startswith("reco-decode") for name in decodes)
    first_forward = events.index(next(e for e in events if e[0] == "forward"))
    assert first_forward < max(i for i, e in enumerate(events) if e[0] == "decode")
    assert sum(kind == "forward" for kind, _ in events) == -(-19 // BATCH)


def test_decode_workers_option_is_typed_and_bounded():
    from reco.errors import ConfigError
    from reco.pipelines.config import EmbedConfig

    assert EmbedConfig().decode_workers >= 1
    assert EmbedConfig(decode_workers=0).decode_workers == 0
    with pytest.raises(ConfigError, match="decode_workers"):
        EmbedConfig(decode_workers=-1)
