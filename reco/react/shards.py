"""The customisation set's images as webdataset tar shards: written, looked up, streamed.

* :class:`ShardWriter`: ``{shard:05d}.tar`` of ``{key}.jpg|png|webp`` + ``{key}.txt`` (caption) +
  ``{key}.json`` (url, caption, key, class_id) written with webdataset's ``TarWriter`` under a
  temporary name then renamed, and ``{shard:05d}.parquet`` with one row per customisation row of
  the shard, failures included (key, url, caption, class_id, status, error_message) — the
  layout img2dataset writes, so an img2dataset download can be read the same way.
* :func:`list_tars`: the tars of a folder, glob or list (sorted).
* :class:`ShardStream`: a sharded ``IterableDataset`` (webdataset pipeline: shard list ->
  ``tarfile_to_samples`` -> ``shuffle`` buffer -> ``decode("pil")`` -> preprocess), split over
  DDP ranks and DataLoader workers by shard, repeating epochs forever with a shard order and a
  shuffle seeded by (seed, epoch, rank, worker): the stream is a function of those alone, so a
  resumed run skips exactly the samples it already trained on (before decoding them).
"""
from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from reco.errors import ConfigError, FormatError
from reco.formats import atomic_write_table

IMAGE_SUFFIXES = "jpg;png;webp;jpeg"
RESULT_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("url", pa.string()), pa.field("caption", pa.string()),
    pa.field("class_id", pa.int64()), pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
], metadata={b"reco.format": b"react-shard-results/1"})


class ShardWriter:
    """Write one shard: ``add`` rows (with ``image`` bytes on successes), then ``close``."""

    def __init__(self, folder: str | Path, shard: int, encode_format: str = "jpg"):
        import webdataset as wds

        self.folder, self.shard, self.fmt = Path(folder), shard, encode_format
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tar = self.folder / f"{shard:05d}.tar"
        self.tmp = self.folder / f".{shard:05d}.tar.tmp-{uuid.uuid4().hex[:8]}"
        self.sink = wds.TarWriter(str(self.tmp))
        self.rows: list[dict] = []

    def add(self, row: dict, image: bytes | None, fmt: str | None = None) -> None:
        """One row; on a success, its ``image`` bytes as member ``{key}.{fmt}`` (default: the
        writer's encode format)."""
        keep = {k: row.get(k) for k in RESULT_SCHEMA.names}
        if image is not None and keep["status"] == "success":
            meta = {k: keep[k] for k in ("url", "caption", "key", "class_id")}
            self.sink.write({"__key__": keep["key"], fmt or self.fmt: image, "txt": keep["caption"] or "",
                             "json": json.dumps(meta)})
        self.rows.append(keep)

    def close(self) -> dict:
        self.sink.close()
        os.replace(self.tmp, self.tar)
        atomic_write_table(pa.Table.from_pylist(self.rows, schema=RESULT_SCHEMA),
                           self.tar.with_suffix(".parquet"))
        ok = sum(r["status"] == "success" for r in self.rows)
        return {"shard": self.shard, "rows": len(self.rows), "success": ok}


def list_tars(where: str | Path | Iterable[str]) -> list[str]:
    """Tars of a folder (recursively), a glob, or a list of paths; sorted. FormatError if none."""
    import glob

    items = [where] if isinstance(where, (str, Path)) else list(where)
    found: set[str] = set()
    for item in map(str, items):
        if os.path.isdir(item):
            found.update(str(p) for p in Path(item).rglob("*.tar") if not p.name.startswith("."))
        else:
            found.update(p for p in glob.glob(item) if p.endswith(".tar"))
    if not found:
        raise FormatError(f"{where}: no webdataset shards (*.tar); run react-download first")
    return sorted(found)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(IterableDataset):
    """Batches (pixels (b, 3, H, W), targets) of this rank's share of the tars (see the module
    docstring): ``targets`` stacks each sample's caption embedding, looked up by key in
    ``targets`` (:class:`reco.react.targets.CaptionTargets`, embedded once before training), or
    is the caption list when ``targets`` is None.

    Args:
        tars: tar paths (:func:`list_tars`).
        preprocess: PIL image -> (3, H, W) tensor (the CLIP's ``preprocess``).
        rank, world: DDP rank and world size; shards go to (rank, worker) round-robin.
        shuffle_buffer: samples held by the shuffle buffer (0: none).
        start, batch: resume at batch ``start`` of ``batch`` samples. DataLoader workers take
            batches round-robin from worker 0, so worker w plays the part of logical reader
            (w + start) % n, which had made batches r, r + n, ... < start: those samples are
            skipped (before decoding).
    """

    def __init__(self, tars: list[str], preprocess: Callable, *, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle_buffer: int = 512, start: int = 0, batch: int = 1,
                 targets=None):
        super().__init__()
        self.targets = targets
        self.tars, self.preprocess, self.seed = list(tars), preprocess, seed
        self.rank, self.world, self.buffer = rank, world, shuffle_buffer
        self.start, self.batch = start, batch

    def check(self, workers: int) -> None:
        slots = self.world * max(1, workers)
        if len(self.tars) < slots:
            raise ConfigError(f"{len(self.tars)} shard(s) for {self.world} rank(s) x "
                              f"{max(1, workers)} worker(s): every reader needs a shard; lower "
                              f"react.shard_size (react-download) or react.workers")

    def _pipeline(self, tars: list[str], rng: random.Random):
        import webdataset as wds

        stages = [wds.SimpleShardList(tars), wds.tarfile_to_samples()]
        if self.targets is not None:               # before the shuffle: one tar at a time
            stages.append(wds.map(self._attach))
        if self.buffer > 1:
            stages.append(wds.shuffle(self.buffer, initial=self.buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def _attach(self, sample: dict) -> dict:
        sample["__target__"] = self.targets.lookup(sample["__url__"], sample["__key__"])
        return sample

    def __iter__(self):
        pixels, targets = [], []
        for px, target in self.samples():
            pixels.append(px)
            targets.append(target)
            if len(pixels) == self.batch:
                yield torch.stack(pixels).float(), (
                    torch.from_numpy(np.stack(targets)) if self.targets is not None else targets)
                pixels, targets = [], []

    def samples(self):
        """(pixels, caption target or caption) of each sample of this reader's stream, forever (epochs)."""
        import webdataset as wds

        wid, nw = _worker()
        reader = (wid + self.start) % nw
        slot, slots = self.rank * nw + reader, self.world * nw
        to_skip = self.batch * len(range(reader, self.start, nw))
        decode = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])
        epoch = 0
        while True:
            order = list(self.tars)
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            mine = order[slot::slots]
            for sample in self._pipeline(mine, random.Random(f"{self.seed}/{epoch}/{slot}")):
                if to_skip:
                    to_skip -= 1
                    continue
                yield self._decode(decode(sample))
            epoch += 1

    def _decode(self, sample: dict):
        image = next((sample[s] for s in IMAGE_SUFFIXES.split(";") if s in sample), None)
        if image is None or "txt" not in sample:
            raise FormatError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no "
                              f"image or no caption member")
        if "__target__" in sample:
            return self.preprocess(image.convert("RGB")), sample["__target__"]
        caption = sample["txt"]
        caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
        return self.preprocess(image.convert("RGB")), caption


def loader(stream: ShardStream, workers: int) -> torch.utils.data.DataLoader:
    """DataLoader of the stream's batches over ``workers`` processes (each makes whole batches)."""
    stream.check(workers)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)


def images_by_url(where: str, urls: list[str], embed_cfg) -> list[bytes]:
    """Image bytes of ``urls`` from an img2dataset-style webdataset download (read with
    embed-memory's ``webdataset`` input kind), in the order asked; FormatError naming the
    first URL it does not hold."""
    import dataclasses

    from reco.pipelines import source_webdataset
    from reco.pipelines.inputs import resolve_inputs

    _, files = resolve_inputs(where, dataclasses.replace(embed_cfg, input_format="webdataset"))
    wanted, found = set(urls), {}
    for file in files:
        for rec in source_webdataset.read(file, embed_cfg):
            if rec.get("url") in wanted and rec.get("image") is not None:
                found.setdefault(rec["url"], rec["image"])
    missing = [u for u in urls if u not in found]
    if missing:
        raise FormatError(f"{where}: no image for url {missing[0]!r} ({len(missing)} missing)")
    return [found[u] for u in urls]
