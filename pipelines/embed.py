"""Embed downloaded shards with open_clip: batched, L2-normalised, model loaded once per worker.

The model is created in ``DoFn.setup`` through a :class:`apache_beam.utils.shared.Shared` handle,
so all DoFn instances (threads) of one worker process share a single copy. Rows whose download
succeeded get ``image_emb`` and ``text_emb`` (float32, unit norm); a success whose bytes PIL
cannot decode becomes ``failed_to_embed``. Image bytes are dropped after embedding.
"""
from __future__ import annotations

import io
import logging

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from reco.formats import STATUS_OK
from reco.pipelines.download import IMAGE_KEY

log = logging.getLogger(__name__)


MAX_PIXELS = 64_000_000      # as img2dataset's decoder is limited (OPENCV_IO_MAX_IMAGE_PIXELS)


def decode(clip, data: bytes):
    """Image bytes -> preprocessed (3, H, W) tensor with the model's eval transform. An image
    of more than :data:`MAX_PIXELS` pixels (a decompression bomb in foreign bytes: img2dataset
    outputs are not resized by reco) is refused from its header, before it is decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"image of {img.width}x{img.height} pixels is larger than "
                             f"{MAX_PIXELS} pixels (decompression bomb?)")
        return clip.preprocess(img.convert("RGB"))


def embed_rows(clip, rows: list[dict], batch_size: int) -> list[dict]:
    """Add ``image_emb``/``text_emb`` to successful rows (in batches of ``batch_size``)."""
    import torch

    from reco.clip import encode_images, encode_texts

    out = [{k: v for k, v in r.items() if k != IMAGE_KEY} for r in rows]
    todo = []
    for i, row in enumerate(rows):
        if row["status"] != STATUS_OK:
            continue
        try:
            todo.append((i, decode(clip, row[IMAGE_KEY])))
        except Exception as exc:  # noqa: BLE001 - any decoder error is this row's failure
            out[i].update(status="failed_to_embed", error_message=f"cannot decode image: {exc}")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        index = [i for i, _ in batch]
        images = encode_images(clip, torch.stack([t for _, t in batch])).numpy()
        texts = encode_texts(clip, [rows[i]["caption"] or "" for i in index]).numpy()
        for j, i in enumerate(index):
            out[i]["image_emb"] = images[j].astype(np.float32)
            out[i]["text_emb"] = texts[j].astype(np.float32)
    return out


class _Model:
    """Weak-referenceable holder for :class:`reco.clip.LoadedClip` (for ``Shared``)."""

    def __init__(self, clip):
        self.clip = clip


class ClipDoFn(beam.DoFn):
    """A DoFn holding one open_clip model per worker process (``self.clip`` after ``setup``),
    shared by its threads through :class:`apache_beam.utils.shared.Shared`."""

    def __init__(self, model: str, pretrained: str | None, batch_size: int, torch_threads: int,
                 device: str = "cpu", precision: str = "fp32"):
        self.model = model
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.torch_threads = torch_threads
        self.device = device
        self.precision = precision
        self._shared = shared.Shared()
        self.embedded = beam.metrics.Metrics.counter("reco.embed", "embedded")
        self.failed = beam.metrics.Metrics.counter("reco.embed", "failed_to_embed")

    def setup(self):
        import torch

        from reco.clip import load_clip, resolve_device

        torch.set_num_threads(self.torch_threads)
        torch.manual_seed(0)          # a model without weights gets the same init in every worker
        device = resolve_device(self.device, "embed.device")   # resolved on the worker: GPU workers say auto
        self._holder = self._shared.acquire(
            lambda: _Model(load_clip(self.model, self.pretrained, device=device, precision=self.precision)),
            tag=f"{self.model}|{self.pretrained}|{device}|{self.precision}")

    @property
    def clip(self):
        return self._holder.clip

    def count(self, rows: list[dict]) -> int:
        """Update the embedded/failed counters from embedded rows; returns the embedded count."""
        done = sum("image_emb" in r for r in rows)
        self.embedded.inc(done)
        self.failed.inc(sum(r["status"] == "failed_to_embed" for r in rows))
        return done


class _EmbedShardFn(ClipDoFn):
    def process(self, element):
        shard, rows = element
        out = embed_rows(self.clip, rows, self.batch_size)
        done = self.count(out)
        log.debug("shard %05d: embedded %d rows", shard, done)
        yield shard, out


class EmbedShards(beam.PTransform):
    """(shard, rows with image bytes) -> (shard, rows with image_emb/text_emb on success)."""

    def __init__(self, model: str, pretrained: str | None, *, batch_size: int = 256,
                 torch_threads: int = 2, device: str = "cpu", precision: str = "fp32"):
        super().__init__()
        self.fn = _EmbedShardFn(model, pretrained, batch_size, torch_threads, device, precision)

    def expand(self, shards):
        return shards | "OpenClip" >> beam.ParDo(self.fn)
