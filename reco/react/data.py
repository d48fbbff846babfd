"""Batches for ``react-train``: (pixels, locked text embeddings) of this rank, from any step.

* :class:`ShardBatches` (``react.image_source=shards``): streams the webdataset tars of
  ``react-download`` through :class:`reco.react.shards.ShardStream` and a DataLoader with
  ``react.workers`` processes; never holds the set. Captions are embedded by the locked text
  tower once, before training (:mod:`reco.react.targets`, ``OUT/targets``), and looked up by key.
* :class:`MemoryBatches` (``world`` / ``embedded``): decodes the whole set into one tensor
  (small sets and test fixtures; :mod:`reco.react.images`).

Both are deterministic functions of (seed, step, rank, world size), so a resumed run sees exactly
the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from reco.config import RecoConfig
from reco.react.config import ReactConfig


@torch.no_grad()
def encode_captions(clip, captions: list[str], batch_size: int = 512) -> torch.Tensor:
    """Locked text tower: L2-normalised caption embeddings."""
    from reco.clip import encode_texts

    return torch.cat([encode_texts(clip, captions[i:i + batch_size])
                      for i in range(0, len(captions), batch_size)])


class ShardBatches:
    def __init__(self, cfg: RecoConfig, clip, o: ReactConfig, rank: int, world: int, targets_dir):
        import functools

        from reco.react.download import default_shards_dir
        from reco.react.shards import list_tars
        from reco.react.targets import CaptionTargets

        self.tars = list_tars(o.shards or default_shards_dir(cfg))
        self.clip, self.o, self.rank, self.world = clip, o, rank, world
        self.batch = max(1, o.batch_size // world)
        self.pairs = _count_success(self.tars)
        self.targets = CaptionTargets(targets_dir, clip.model_id)
        self.targets.build(self.tars, functools.partial(encode_captions, clip), rank=rank, world=world)
        barrier(world)                                    # every rank's share written

    def __call__(self, start: int):
        from reco.react.shards import ShardStream, loader

        stream = ShardStream(self.tars, self.clip.preprocess, seed=self.o.seed, rank=self.rank,
                             world=self.world, shuffle_buffer=self.o.shuffle_buffer,
                             start=start, batch=self.batch, targets=self.targets)
        yield from loader(stream, self.o.workers)


def barrier(world: int) -> None:
    """Wait for every DDP rank (nothing alone)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _count_success(tars: list[str]) -> int | None:
    """Pairs in the shards, from their results Parquet (None when a tar has none)."""
    import os

    from reco.pipelines.source_webdataset import read_sidecar

    total = 0
    for tar in tars:
        side = tar[:-4] + ".parquet"
        if not os.path.isfile(side):
            return None
        status = read_sidecar(side, tar, columns=["status"]).column("status")
        total += int(pa.compute.sum(pa.compute.equal(status, "success")).as_py() or 0)
    return total


class MemoryBatches:
    def __init__(self, cfg: RecoConfig, table: pa.Table, clip, o: ReactConfig, rank: int, world: int):
        from reco.react import images

        self.pixels = images.load_pixels(cfg, table, clip.preprocess, source=o.image_source)
        self.targets = encode_captions(clip, table.column("caption").to_pylist())
        self.o, self.rank, self.world = o, rank, world
        self.pairs = n = self.pixels.shape[0]
        self.batch = min(o.batch_size, n)                      # global
        self.per_epoch = max(1, n // self.batch)

    def __call__(self, start: int):
        per_rank = max(1, self.batch // self.world)
        epoch, order = -1, None
        for step in range(start, 1 << 62):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                g = torch.Generator().manual_seed(self.o.seed * 1_000_003 + epoch)
                order = torch.randperm(self.pixels.shape[0], generator=g)
            j = (step % self.per_epoch) * self.batch + self.rank * per_rank
            idx = order[j:j + per_rank]
            yield self.pixels[idx], self.targets[idx]


def make_batches(cfg: RecoConfig, clip, o: ReactConfig, rank: int, world: int, table=None,
                 targets_dir=None):
    """The batch source of ``react.image_source``: streamed shards (caption targets embedded
    once into ``targets_dir``) or a tensor in memory (``table``: the customisation set)."""
    if o.image_source == "shards":
        return ShardBatches(cfg, clip, o, rank, world, targets_dir)
    return MemoryBatches(cfg, table, clip, o, rank, world)
