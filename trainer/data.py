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

Bad input is one :class:`~reco.errors.FormatError` naming the shard: :func:`read_tensors_info`
reads every shard's footer once (readable Parquet, format version, columns, ``reco.*`` metadata,
row groups) before training starts (shards of the older format ``tensors/1`` are refused, with
the advice to rerun ``reco precompute-neighbours --force``); each row group read is checked for
decoding errors, nulls, NaN/inf values and the footer's row count (a bit-level NaN/inf test on
the decoded float16 view).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from reco.errors import ConfigError, FormatError
from reco.formats import (Manifest, check_columns, check_tensors_format, decode_block, parse_field,
                          tensors_schema)
from reco.validate import READ_ERRORS


@dataclass
class TensorsInfo:
    """What a tensors folder holds (validated): shard paths, row-group sizes, dims, model."""

    folder: str
    shards: list[str]
    row_groups: list[list[int]]          # rows of each row group, per shard
    dim: int
    k: int
    fields: tuple[str, ...]
    model_id: str = ""
    manifest: dict = field(default_factory=dict)
    digest: str = ""                     # what the heads' record names the tensors by

    @property
    def rows(self) -> int:
        return int(sum(sum(r) for r in self.row_groups))


def _meta(schema, key: str, path: str = "") -> str | None:
    value = (schema.metadata or {}).get(f"reco.{key}".encode())
    try:
        return value.decode() if value is not None else None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: bad reco.{key} metadata {value!r}") from exc


def _meta_int(schema, key: str, path: str) -> int | None:
    value = _meta(schema, key, path)
    try:
        return int(value) if value else None
    except ValueError as exc:
        raise FormatError(f"{path}: bad reco.{key} metadata {value!r}") from exc


def _positive(value, name: str, where: str) -> int | None:
    """A manifest info value: absent (None/0/"") or a positive integer."""
    if value in (None, 0, ""):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{where}: info.{name} is {value!r}, expected a positive integer")
    return value


def _manifest_fields(value, first, where: str, first_path: str) -> tuple[str, ...]:
    """Context fields from the manifest info (a list of names), else the first shard's metadata."""
    if value in (None, "", []):
        value = (_meta(first, "fields", first_path) or "").split(",")
        where = first_path
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise FormatError(f"{where}: info.fields is {value!r}, expected a list of field names")
    fields = tuple(f for f in value if f)
    for name in fields:
        try:
            parse_field(name)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from exc
    return fields


def read_tensors_info(folder: str | os.PathLike, need: tuple[str, ...] = ()) -> TensorsInfo:
    """Read and validate ``folder/manifest.json`` and the shards' footers (no data is read).

    Args:
        folder: the tensors folder (``cfg.paths.neighbours / "tensors"``).
        need: context fields the caller will read; each must be present in every shard.
    """
    folder = str(folder)
    manifest = Manifest.read(folder)
    where = os.path.join(folder, Manifest.FILE)
    if "tensor" not in manifest.kind:
        raise FormatError(f"{where}: manifest of kind {manifest.kind!r}, expected trainer tensors")
    if not manifest.shards:
        raise FormatError(f"{where}: lists no shards")
    paths = manifest.shard_paths(folder)
    digest, recorded_rows = _check_against_record(folder, manifest)
    first_meta, first = _read_footer(paths[0])
    check_tensors_format(first, paths[0])        # before its metadata is trusted
    dim = _positive(manifest.info.get("dim"), "dim", where) or _meta_int(first, "dim", paths[0]) or 0
    k = _positive(manifest.info.get("k"), "k", where) or _meta_int(first, "k", paths[0]) or 0
    fields = _manifest_fields(manifest.info.get("fields"), first, where, paths[0])
    if dim <= 0 or k <= 0:
        raise FormatError(f"{where}: no embedding dim/k in the manifest info or shard metadata")
    for name in need:
        if name not in fields:
            raise FormatError(f"{where}: context field {name!r} was not precomputed (has {list(fields)}); "
                              f"add it to neighbours.fields and rerun precompute-neighbours")
    required = tensors_schema(dim, k, tuple(need))
    row_groups = []
    for path in paths:                     # footers only: a bad shard fails here, before training
        meta, schema = (first_meta, first) if path == paths[0] else _read_footer(path)
        check_tensors_format(schema, path)
        check_columns(schema, required, path)
        for key, want in (("dim", dim), ("k", k)):
            got = _meta_int(schema, key, path)
            if got is not None and got != want:
                raise FormatError(f"{path}: reco.{key}={got} but the manifest says {want}")
        row_groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        _check_rows(path, meta.num_rows, recorded_rows, manifest.counts, where)
    _check_ids(paths, where)
    model_id = str(manifest.info.get("model_id") or manifest.info.get("model") or "")
    return TensorsInfo(folder, paths, row_groups, dim, k, fields, model_id,
                       {"kind": manifest.kind, "counts": manifest.counts, "info": manifest.info},
                       digest)


def _check_against_record(folder: str, manifest: Manifest) -> tuple[str, dict[str, int]]:
    """The tensors folder against the neighbour pass's run record (``../record.json``): the
    manifest lists exactly the recorded shards, each with its recorded digest. Returns the
    record's digest (or the manifest's, without a record: tensors written by other tools) and
    the recorded rows by shard name."""
    from dataclasses import asdict

    from reco.record import FILE, Record, json_digest

    parent, sub = os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.normpath(folder))
    record = Record.read(parent, "neighbours")
    if record is None:
        return json_digest({"manifest": asdict(manifest)}), {}
    if not record.complete:
        raise FormatError(f"{parent}/{FILE}: the neighbour pass is incomplete; rerun "
                          f"`reco precompute-neighbours` to finish it")
    recorded = {n.split("/", 1)[1]: e for n, e in record.outputs.items() if n.startswith(f"{sub}/")}
    if set(manifest.shards) != set(recorded):
        diff = sorted(set(recorded) ^ set(manifest.shards))
        raise FormatError(f"{folder}/{Manifest.FILE} lists {len(manifest.shards)} shard(s), the "
                          f"record {len(recorded)} (first difference: {diff[0]}); rerun "
                          f"`reco precompute-neighbours --force`")
    record.verify(parent, [f"{sub}/{n}" for n in manifest.shards], command="precompute-neighbours")
    return record.digest(), {n: e["rows"] for n, e in recorded.items() if isinstance(e.get("rows"), int)}


def _check_rows(path: str, rows: int, recorded: dict[str, int], counts: dict, where: str) -> None:
    """A shard's footer rows against its recorded rows and the manifest's count."""
    name = os.path.basename(path)
    for what, want in (("the record", recorded.get(name)), (where, counts.get(name))):
        if want is not None and want != rows:
            raise FormatError(f"{path}: {rows} rows, but {what} says {want}")


def _check_ids(paths: list[str], where: str) -> None:
    """Pair ids unique across shards (a shard copied over another repeats ids)."""
    parts = []
    for path in paths:
        try:
            parts.append(pq.read_table(path, columns=["id"]).column("id").to_numpy())
        except READ_ERRORS as exc:
            raise FormatError(f"{path}: unreadable id column ({type(exc).__name__}: {exc})") from exc
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(same):
        shard = np.repeat(np.arange(len(paths)), [len(p) for p in parts])
        first, second = order[same[0]], order[same[0] + 1]
        raise FormatError(f"{paths[shard[second]]}: pair id {int(ids[first])} also in "
                          f"{os.path.basename(paths[shard[first]])} (duplicate ids; see {where})")


def _read_footer(path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    """One shard's Parquet footer (row groups) and Arrow schema (with its ``reco.*`` metadata),
    read once at open; a missing or corrupt file is a FormatError naming it."""
    try:
        meta = pq.read_metadata(path)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: shard listed in the manifest is missing") from exc
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    try:
        return meta, meta.schema.to_arrow_schema()
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: unreadable Parquet schema ({type(exc).__name__}: {exc})") from exc


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
        """One row group as float16 arrays (views of the Arrow buffers, read-only); any
        read/decoding problem, a null, a NaN/inf value or a row count other than the footer's is
        a FormatError naming the shard."""
        path, d, k = self.info.shards[shard], self.info.dim, self.info.k
        try:
            if shard not in files:
                files[shard] = pq.ParquetFile(path)
            table = files[shard].read_row_group(group, columns=["id", "v", "t", *self.fields])
        except READ_ERRORS as exc:
            raise FormatError(f"{path}: cannot read row group {group} "
                              f"({type(exc).__name__}: {exc})") from exc
        where = f"{path}: row group {group}"
        expected = self.info.row_groups[shard][group]
        if table.num_rows != expected:
            raise FormatError(f"{where} has {table.num_rows} rows, its footer said {expected} "
                              f"(file changed since it was opened?)")
        for name in table.column_names:
            if table.column(name).null_count:
                raise FormatError(f"{where}: column {name!r} has {table.column(name).null_count} null(s)")
        out = {"id": table.column("id").to_numpy()}
        for name in ("v", "t"):
            out[name] = decode_block(table.column(name), d, 1, f"{where}: column {name!r}")[:, 0]
        for name in self.fields:
            block = decode_block(table.column(name), d, k, f"{where}: column {name!r}")
            out[name] = block if self.k == k else np.ascontiguousarray(block[:, :self.k])
        for name in ("v", "t", *self.fields):
            _check_finite_fp16(out[name], out["id"], name, where)
        return out

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


def _check_finite_fp16(values: np.ndarray, ids: np.ndarray, name: str, where: str) -> None:
    """FormatError at the first row holding a NaN/inf. float16 NaN/inf have all exponent bits
    set: as uint16 they are >= 0xFC00 (negative) and as int16 >= 0x7C00 (positive), so two SIMD
    max reductions over the bits check a block without temporaries (np.isfinite on float16 is
    several times slower)."""
    if not values.size:
        return
    bits = values.reshape(len(values), -1).view(np.uint16)
    if bits.max() < 0xFC00 and bits.view(np.int16).max() < 0x7C00:
        return
    bad = ((bits & 0x7C00) == 0x7C00).any(axis=1)
    row = int(np.argmax(bad))
    raise FormatError(f"{where}: column {name!r} has {int(bad.sum())} row(s) with NaN/inf, "
                      f"first at row {row} of the group (id {int(ids[row])})")


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
