"""Streaming reader of the trainer tensors (``neighbours/tensors``, :func:`reco.formats.tensors_schema`,
format ``tensors/2``: float16 vectors as fixed-size binary values, decoded by
:func:`reco.formats.decode_block` as views of the row group's buffers, without copying).

The data set is never loaded whole. Each epoch the row groups of all shards are permuted with a
seed derived from ``(seed, epoch)``, cut into blocks of at most ``block_rows`` rows and split into
contiguous runs, one per consumer (``rank * num_workers + worker``), so consumers never overlap and
together cover every row once per epoch. A consumer reads its blocks in order (one row group in
memory at a time), passes them through a shuffling buffer (drained at the end of every epoch) and
cuts batches from the endless concatenation of its epochs.

Because an epoch's stream depends only on ``(seed, epoch, consumer)``, the position after ``S``
training steps is known without state: DataLoader takes batches from its workers round-robin, so
worker ``w`` produced ``len(range(w, S, W))`` batches. :class:`TensorStream` with
``start_step=S`` skips whole epochs from metadata and replays only the current one (DataLoader
worker ``j`` then plays logical worker ``(j + S) % W``, because the round-robin restarts at 0).

Shards are opened and each row group is read and validated by :mod:`reco.trainer.tensors`, the
one reader of trainer tensors.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from reco.errors import ConfigError
from reco.formats import parse_field
from reco.trainer.tensors import TensorsInfo, read_row_group, read_tensors_info  # noqa: F401


def context_fields(train_cfg) -> tuple[str, ...]:
    """The context fields a TrainConfig reads: image side (v_*) and/or text side (t_*)."""
    out = []
    for on, name, query in ((train_cfg.fuse_image, train_cfg.image_context, "v"),
                            (train_cfg.fuse_text, train_cfg.text_context, "t")):
        if on:
            if parse_field(name)[0] != query:
                raise ConfigError(f"context field {name!r} does not start with {query!r} "
                                  f"({'image' if query == 'v' else 'text'} side)")
            out.append(name)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the plan: which blocks each consumer reads in an epoch
# ---------------------------------------------------------------------------------------------

def epoch_blocks(info: TensorsInfo, *, seed: int, epoch: int, consumer: int, consumers: int,
                 block_rows: int) -> list[tuple[int, int, int, int]]:
    """(shard, row_group, lo, hi) blocks of ``consumer`` in ``epoch``, in reading order."""
    groups = [(s, g, n) for s, sizes in enumerate(info.row_groups) for g, n in enumerate(sizes) if n]
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(groups))
    blocks = [(s, g, lo, min(lo + block_rows, n))
              for s, g, n in (groups[i] for i in order) for lo in range(0, n, block_rows)]
    # contiguous runs: a row group is decoded by at most two consumers (not by all of them)
    return blocks[consumer * len(blocks) // consumers:(consumer + 1) * len(blocks) // consumers]


def effective_block_rows(info: TensorsInfo, consumers: int, block_rows: int) -> int:
    """Blocks small enough that every consumer gets several per epoch."""
    if info.rows < consumers:
        raise ConfigError(f"{info.folder}: {info.rows} rows cannot feed {consumers} consumers "
                          f"(world size x num_workers)")
    return max(1, min(block_rows, info.rows // (4 * consumers) or 1))


# ---------------------------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------------------------

class _Shuffler:
    """Shuffling buffer over dicts of row-aligned arrays: each incoming row takes a random slot
    and pushes its occupant out (vectorised per chunk); :meth:`drain` empties it at random."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.buf, self.n = size, rng, None, 0

    def push(self, chunk: dict[str, np.ndarray]):
        if self.size <= 0:
            yield chunk
            return
        m = len(chunk["id"])
        if self.buf is None:
            self.buf = {key: np.empty((self.size, *a.shape[1:]), a.dtype) for key, a in chunk.items()}
        start = 0
        if self.n < self.size:                           # fill first
            take = min(self.size - self.n, m)
            for key, a in chunk.items():
                self.buf[key][self.n:self.n + take] = a[:take]
            self.n, start = self.n + take, take
        while start < m:
            piece = min(m - start, self.size)
            slots = self.rng.choice(self.size, size=piece, replace=False)
            out = {key: b[slots] for key, b in self.buf.items()}
            for key, a in chunk.items():
                self.buf[key][slots] = a[start:start + piece]
            start += piece
            yield out

    def drain(self):
        if self.size > 0 and self.n:
            perm = self.rng.permutation(self.n)
            yield {key: b[:self.n][perm] for key, b in self.buf.items()}
        self.n = 0


class TensorStream(IterableDataset):
    """Endless (or ``epochs``-long) stream of batches ``{"id", "v", "t", <field>: (B, k, d)}``.

    Args:
        info: :func:`read_tensors_info` of the tensors folder.
        fields: context fields to yield (each sliced to the first ``k`` neighbours).
        k: neighbours per query (<= stored k).
        batch_size: rows per batch (per rank).
        shuffle_buffer: rows in the shuffling buffer (0: block order only).
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        rank, world_size: this process in a distributed run.
        num_workers: DataLoader workers that will iterate this dataset (0 counts as 1).
        start_step: batches (per rank) already consumed; the stream resumes right after them.
        epochs: stop after this many epochs per consumer (last batch may be short); None: endless.
        block_rows: largest block (unit of work); smaller when needed to feed every consumer.
    """

    def __init__(self, info: TensorsInfo, *, fields: tuple[str, ...], k: int, batch_size: int,
                 shuffle_buffer: int = 8192, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, start_step: int = 0, epochs: int | None = None,
                 block_rows: int = 1024):
        super().__init__()
        if not 0 < k <= info.k:
            raise ConfigError(f"train.k={k} must be in 1..{info.k} (neighbours stored in {info.folder})")
        if batch_size <= 0:
            raise ConfigError(f"train.batch_size={batch_size} must be positive")
        self.info, self.fields, self.k, self.batch_size = info, tuple(fields), k, batch_size
        self.shuffle_buffer, self.seed, self.epochs = shuffle_buffer, seed, epochs
        self.rank, self.world_size = rank, world_size
        self.loader_workers = num_workers                  # DataLoader processes (0: in the main one)
        self.num_workers, self.start_step = max(1, num_workers), start_step
        self.consumers = world_size * self.num_workers
        self.block_rows = effective_block_rows(info, self.consumers, block_rows)

    # -- plan -----------------------------------------------------------------------------
    def _blocks(self, epoch: int, consumer: int):
        return epoch_blocks(self.info, seed=self.seed, epoch=epoch, consumer=consumer,
                            consumers=self.consumers, block_rows=self.block_rows)

    def skip_rows(self, worker: int) -> int:
        """Rows that ``worker`` already delivered in the first ``start_step`` batches."""
        return len(range(worker, self.start_step, self.num_workers)) * self.batch_size

    def _locate(self, consumer: int, skip: int) -> tuple[int, int]:
        """(epoch, rows to drop in it) after skipping ``skip`` rows of the consumer's stream."""
        epoch = 0
        while True:
            n = sum(hi - lo for _, _, lo, hi in self._blocks(epoch, consumer))
            if skip < n or (self.epochs is not None and epoch >= self.epochs):
                return epoch, skip
            skip -= n
            epoch += 1

    # -- reading --------------------------------------------------------------------------
    def _read_group(self, files: dict, shard: int, group: int) -> dict[str, np.ndarray]:
        """One row group, validated (:func:`reco.trainer.tensors.read_row_group`), each field
        cut to the first ``k`` neighbours."""
        return read_row_group(self.info, files, shard, group, self.fields, self.k)

    def _epoch_chunks(self, epoch: int, consumer: int):
        shuffler = _Shuffler(self.shuffle_buffer, np.random.default_rng([self.seed, epoch, consumer, 11]))
        cached_key, cached, files = None, None, {}
        for shard, group, lo, hi in self._blocks(epoch, consumer):
            if (shard, group) != cached_key:
                cached_key, cached = (shard, group), self._read_group(files, shard, group)
            yield from shuffler.push({key: a[lo:hi] for key, a in cached.items()})
        yield from shuffler.drain()

    def _rows(self, consumer: int, skip: int):
        epoch, drop = self._locate(consumer, skip)
        while self.epochs is None or epoch < self.epochs:
            for chunk in self._epoch_chunks(epoch, consumer):
                n = len(chunk["id"])
                if drop >= n:
                    drop -= n
                    continue
                if drop:
                    chunk, drop = {key: a[drop:] for key, a in chunk.items()}, 0
                yield chunk
            epoch += 1

    def __iter__(self):
        winfo = get_worker_info()
        worker = winfo.id if winfo is not None else 0
        if (winfo.num_workers if winfo is not None else 0) != self.loader_workers:
            raise ConfigError(f"TensorStream planned for {self.loader_workers} DataLoader workers, "
                              f"got {winfo.num_workers if winfo else 0}")
        # DataLoader always starts its round-robin at worker 0, while batch ``start_step`` belongs
        # to logical worker start_step % W: rotate the roles so the resumed order is unchanged.
        worker = (worker + self.start_step) % self.num_workers
        consumer = self.rank * self.num_workers + worker
        pending, count = [], 0
        for chunk in self._rows(consumer, self.skip_rows(worker)):
            pending.append(chunk)
            count += len(chunk["id"])
            while count >= self.batch_size:
                batch, pending, count = _cut(pending, self.batch_size)
                yield batch
        if count:
            yield _cut(pending, count)[0]


def _cut(pending: list[dict], n: int) -> tuple[dict, list[dict], int]:
    """First ``n`` rows of the pending chunks as a torch batch, and the rest."""
    merged = {key: np.concatenate([c[key] for c in pending]) if len(pending) > 1 else pending[0][key]
              for key in pending[0]}
    batch = {key: torch.from_numpy(_owned(a[:n])) for key, a in merged.items()}
    rest = {key: a[n:] for key, a in merged.items()}
    left = len(rest["id"])
    return batch, ([rest] if left else []), left


def _owned(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def make_loader(stream: TensorStream, *, pin_memory: bool = False) -> DataLoader:
    """DataLoader over a :class:`TensorStream` (batches are built in the workers)."""
    workers = stream.loader_workers
    # its own generator: creating the iterator must not consume the global torch RNG (resume)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(stream.seed))
