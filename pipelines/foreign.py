"""What the foreign input kinds (webdataset, parquet-images) share: stream one input file, a
batch of images at a time, through open_clip, without any network access.

A kind supplies ``read(file, cfg)``: a generator of rows ``{id, url, caption, label, status,
error_message, key}`` for one :class:`~reco.pipelines.inputs.ShardFile`, in any order, each
``id`` in ``[file.offset, file.offset + file.rows)`` once; a row to embed has status ``success``
and its image bytes under :data:`~reco.pipelines.download.IMAGE_KEY`. A member that cannot be
used (no image, no caption, unreadable rest of a tar) comes with status ``failed_to_embed`` and a
message naming the file and key; an undecodable image becomes ``failed_to_embed`` when embedded
(:func:`reco.pipelines.embed.embed_rows`). Nothing but one batch of image bytes is held at once.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import apache_beam as beam

from reco.formats import STATUS_OK
from reco.pipelines.download import IMAGE_KEY
from reco.pipelines.embed import ClipDoFn, embed_rows

log = logging.getLogger(__name__)
FAILED = "failed_to_embed"
KEY_COLUMN = "key"          # extra column of the embedded shards of foreign inputs


def row(id_: int, *, url=None, caption=None, key=None, status=STATUS_OK, error=None,
        image: bytes | None = None) -> dict:
    out = {"id": id_, "url": url, "caption": caption, "label": None, "status": status,
           "error_message": error, KEY_COLUMN: key}
    if image is not None:
        out[IMAGE_KEY] = image
    return out


def complete(rows: list[dict], file) -> list[dict]:
    """Rows sorted by id, one per id of ``file``: an id the reader never produced (a file that
    changed since it was inspected) becomes a failed row saying so."""
    by_id = {r["id"]: r for r in rows}
    missing = [i for i in range(file.offset, file.offset + file.rows) if i not in by_id]
    for i in missing:
        by_id[i] = row(i, status=FAILED, error=f"{file.path}: sample missing (file changed since "
                                               f"it was inspected?)")
    if missing:
        log.warning("%s: %d sample(s) missing", file.path, len(missing))
    return [by_id[i] for i in sorted(by_id) if file.offset <= i < file.offset + file.rows]


def _locate(r: dict, file) -> dict:
    """A failure message names the file and sample (embed_rows' decoder message does not)."""
    message = r["error_message"]
    if r["status"] == FAILED and message and not message.startswith(file.path):
        r = {**r, "error_message": f"{file.path}: sample {r[KEY_COLUMN]!r}: {message}"}
    return r


class _EmbedFileFn(ClipDoFn):
    """ShardFile -> (shard, embedded rows), streaming the file's rows in batches."""

    def __init__(self, read: Callable, cfg, model: str, pretrained: str | None):
        super().__init__(model, pretrained, cfg.batch_size, cfg.torch_threads,
                         cfg.device or "cpu", cfg.precision or "fp32", cfg.decode_workers)
        self.read = read
        self.cfg = cfg

    def process(self, file):
        done, pending, images = [], [], 0
        for r in self.read(file, self.cfg):
            pending.append(r)
            images += IMAGE_KEY in r
            if images >= self.batch_size:
                done += embed_rows(self.clip, pending, self.batch_size, self.decode_workers)
                pending, images = [], 0
        done += embed_rows(self.clip, pending, self.batch_size, self.decode_workers)
        out = [_locate(r, file) for r in complete(done, file)]
        n = self.count(out)
        log.info("shard %05d: embedded %d of %d rows of %s", file.shard, n, len(out), file.path)
        yield file.shard, out


class ForeignSource(beam.PTransform):
    """PBegin -> (shard, embedded rows) for each input file whose shard is not complete."""

    def __init__(self, job, read: Callable[..., Iterator[dict]]):
        super().__init__()
        self.job = job
        self.read = read

    def expand(self, pbegin):
        job = self.job
        todo = [f for f in job.files if f.shard not in set(job.skip)]
        return (pbegin
                | "ListFiles" >> beam.Create(todo)
                | "SpreadFiles" >> beam.Reshuffle()
                | "StreamEmbed" >> beam.ParDo(_EmbedFileFn(self.read, job.cfg, job.model, job.pretrained)))


def num_shards(files: list, shard_size: int) -> int:
    """One output shard per input file."""
    return len(files)
