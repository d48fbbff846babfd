"""Embed downloaded shards with open_clip: batched, L2-normalised, model loaded once per worker.

The model is created in ``DoFn.setup`` through a :class:`apache_beam.utils.shared.Shared` handle,
so all DoFn instances (threads) of one worker process share a single copy. Rows whose download
succeeded get ``image_emb`` and ``text_emb`` (float32, unit norm); a success whose bytes PIL
cannot decode becomes ``failed_to_embed``. Image bytes are dropped after embedding.

Feeding the encoder (:func:`embed_rows`): decode + preprocess run in ``embed.decode_workers``
threads and tokenisation in one more thread, one batch ahead of the forward, so that the encoder
(a GPU in production) does not wait for a serial decoder; the results are the serial path's.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import itertools
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor

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


class _Inline:
    """An executor that runs each task at once in the calling thread (the serial path)."""

    def submit(self, fn, *args):
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False):
        pass


@contextlib.contextmanager
def _executors(decode_workers: int):
    """(decoder, tokeniser): a pool of ``decode_workers`` threads and ONE tokeniser thread (open_clip's
    Hugging Face tokenizers must not run concurrently); both inline when ``decode_workers`` <= 1."""
    if decode_workers <= 1:
        yield _Inline(), _Inline()
        return
    decoder = ThreadPoolExecutor(decode_workers, thread_name_prefix="reco-decode")
    tokeniser = ThreadPoolExecutor(1, thread_name_prefix="reco-tokenise")
    try:
        yield decoder, tokeniser
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)
        tokeniser.shutdown(wait=True, cancel_futures=True)


def _ahead(executor, fn, items: list, ahead: int):
    """fn(item) for every item, results in order, at most ``ahead`` tasks submitted ahead of the
    one consumed (they run while the consumer works on earlier results)."""
    pending, it = collections.deque(), iter(items)
    for item in itertools.islice(it, ahead):
        pending.append(executor.submit(fn, item))
    while pending:
        done = pending.popleft()
        nxt = next(it, _END)
        if nxt is not _END:
            pending.append(executor.submit(fn, nxt))
        yield done.result()


_END = object()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")    # PIL names the BytesIO by address: not reproducible


def _decoded(clip, rows: list[dict], i: int):
    """(i, tensor, None) or (i, None, error message) for row i (run in the decode pool)."""
    try:
        return i, decode(clip, rows[i][IMAGE_KEY]), None
    except Exception as exc:  # noqa: BLE001 - any decoder error is this row's failure
        return i, None, f"cannot decode image: {_ADDRESS.sub('', str(exc))}"


def _batches(clip, rows: list[dict], out: list[dict], batch_size: int, decoder, tokeniser):
    """(row indices, stacked pixels, future of the tokens) per batch of ``batch_size`` DECODED
    images, in row order; the next batch is decoded (and this one tokenised) while the caller
    runs the forward. Undecodable rows are marked ``failed_to_embed`` in ``out``."""
    import torch

    todo = [i for i, row in enumerate(rows) if row["status"] == STATUS_OK]
    batch: list[tuple[int, object]] = []

    def emit():
        index = [i for i, _ in batch]
        captions = [rows[i]["caption"] or "" for i in index]
        return index, torch.stack([t for _, t in batch]), tokeniser.submit(clip.tokenizer, captions)

    for i, tensor, error in _ahead(decoder, functools.partial(_decoded, clip, rows), todo, batch_size):
        if error is not None:
            out[i].update(status="failed_to_embed", error_message=error)
            continue
        batch.append((i, tensor))
        if len(batch) == batch_size:
            yield emit()
            batch = []
    if batch:
        yield emit()


def embed_rows(clip, rows: list[dict], batch_size: int, decode_workers: int = 0) -> list[dict]:
    """Add ``image_emb``/``text_emb`` to successful rows (in batches of ``batch_size`` decoded
    images); rows PIL cannot decode become ``failed_to_embed``. Image bytes are dropped.

    ``decode_workers`` > 1: decode + preprocess run in that many threads and tokenisation in
    one more, a batch ahead of the forward (batch i+1 is decoded while batch i is encoded);
    0 or 1: everything in the calling thread. Both give the same rows, in the same order, with
    the same batches (so the same embeddings)."""
    from reco.clip import encode_images, encode_tokens

    out = [{k: v for k, v in r.items() if k != IMAGE_KEY} for r in rows]
    with _executors(min(decode_workers, len(rows))) as (decoder, tokeniser):
        for index, pixels, tokens in _batches(clip, rows, out, batch_size, decoder, tokeniser):
            images = encode_images(clip, pixels).numpy()
            texts = encode_tokens(clip, tokens.result()).numpy()
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
                 device: str = "cpu", precision: str = "fp32", decode_workers: int = 0):
        self.model = model
        self.decode_workers = decode_workers
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
        out = embed_rows(self.clip, rows, self.batch_size, self.decode_workers)
        done = self.count(out)
        log.debug("shard %05d: embedded %d rows", shard, done)
        yield shard, out


class EmbedShards(beam.PTransform):
    """(shard, rows with image bytes) -> (shard, rows with image_emb/text_emb on success)."""

    def __init__(self, model: str, pretrained: str | None, *, batch_size: int = 256,
                 torch_threads: int = 2, device: str = "cpu", precision: str = "fp32",
                 decode_workers: int = 0):
        super().__init__()
        self.fn = _EmbedShardFn(model, pretrained, batch_size, torch_threads, device, precision,
                                decode_workers)

    def expand(self, shards):
        return shards | "OpenClip" >> beam.ParDo(self.fn)
