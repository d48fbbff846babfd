"""Output shards of the neighbour pass: planning, Arrow tables, writing, resume and manifests
(no Beam, no faiss).

Output, under ``cfg.paths.neighbours``:

``ids/part-NNNNN.parquet`` (``reco.formats.neighbours_schema(k, searches)``)
    ``id`` (training pair id) and per search ``s`` in ``search_keys(fields)`` (e.g. ``v_img``):
    ``{s}_ids`` memory ids best first (-1 = none) and ``{s}_scores`` inner products (-inf = none).
    The schema metadata ``reco.stats`` holds the shard's exclusion counts (JSON).
``tensors/part-NNNNN.parquet`` (``reco.formats.tensors_schema(dim, k, fields)``, format
``tensors/2``)
    ``id``, ``v``, ``t`` (the pair's embeddings) and one column per context field (e.g.
    ``v_img_txt``): the (k, dim) block of the memory embeddings of the fused modality of the
    hits, best first; zero rows where the id is -1. Every vector column is fixed-size binary:
    per row the little-endian float16 values, row-major (``v``/``t``: 2*dim bytes, a field:
    2*k*dim bytes), written and read with ``reco.formats.encode_block`` / ``decode_block``.
    Rows are in the same order as in ``ids/``. Shards hold ``neighbours.shard_size`` rows (the
    last one fewer).
``ids/manifest.json``, ``tensors/manifest.json`` (kind ``neighbours`` / ``tensors``)
    complete shards in order, ``counts`` (rows per shard and ``total``), ``info`` (dim, k, fields,
    searches, model_id, dedup options, index info). Written after all shards; every file is
    written atomically. ``plan.json`` records what the shards were computed from: a run with
    other inputs or options (or shards of an older tensors format, or computed from embedded
    shards of an older format) starts over instead of resuming.

Tables are built from whole numpy
buffers without per-row objects: ids/scores as one FixedSizeList per column over one flat array,
the float16 vectors of the tensors as fixed-size binary values over the array's own buffer
(``reco.formats.encode_block``, no copy). Both are written without statistics or dictionaries:
min/max of vectors are useless to the trainer and cost more than the encoding itself.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco import formats
from reco.errors import FormatError
from reco.validate import check_dim, check_ids
from reco.embedded import EmbeddedFolder, success_count

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"
SUBDIRS = ("ids", "tensors")
# tensors: float16 blocks do not compress (snappy: < 0.1% smaller, +60% CPU) and larger write
# batches or pages only cost more for fixed-size binary values; ids: small, snappy.
WRITE_OPTIONS = {"ids": {"use_dictionary": False, "write_statistics": False},
                 "tensors": {"use_dictionary": False, "write_statistics": False, "compression": "none"}}


@dataclass(frozen=True)
class ShardSpec:
    name: str                                   # output file name, e.g. part-00000.parquet
    slices: tuple[tuple[str, int, int], ...]    # (input shard, start, stop) over its success rows
    n_rows: int


def plan_shards(split: EmbeddedFolder, shard_size: int) -> list[ShardSpec]:
    """Cut the success rows of ``split`` (manifest order) into output shards of ``shard_size``."""
    if shard_size < 1:
        raise FormatError(f"neighbours.shard_size must be >= 1, got {shard_size}")
    specs, slices, rows = [], [], 0

    def close():
        nonlocal slices, rows
        if rows:
            specs.append(ShardSpec(f"part-{len(specs):05d}.parquet", tuple(slices), rows))
        slices, rows = [], 0

    for path in split.shards:
        n, start = success_count(path), 0
        while start < n:
            take = min(shard_size - rows, n - start)
            slices.append((path, start, start + take))
            rows, start = rows + take, start + take
            if rows == shard_size:
                close()
    close()
    return specs


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_plan(path: Path) -> dict:
    """``plan.json``, validated: a JSON object with a string ``fingerprint`` (FormatError naming
    the file and how to start over otherwise)."""
    from reco.validate import read_json

    try:
        return read_json(path, {"fingerprint": str})
    except FormatError as exc:
        raise FormatError(f"{exc}; rerun `reco precompute-neighbours --force` to recompute the "
                          f"neighbours") from exc


def reset_if_stale(out: Path, plan: dict) -> bool:
    """Remove previous shards computed from other inputs/options; record the plan. True if reset."""
    path = out / PLAN_FILE
    old = read_plan(path) if path.exists() else None
    stale = old is not None and old.get("fingerprint") != plan["fingerprint"]
    for sub in SUBDIRS:                   # hidden temporaries of a killed run: never read, drop them
        formats.remove_temporaries(out / sub)
    if stale or old is None:
        for sub in SUBDIRS:               # manifests first: none may list a deleted shard
            (out / sub / formats.Manifest.FILE).unlink(missing_ok=True)
        for sub in SUBDIRS:
            folder = out / sub
            for f in folder.glob("*.parquet") if folder.exists() else []:
                f.unlink()
        if stale:
            log.warning("%s: inputs or options changed since the last run; recomputing all shards", out)
    formats.atomic_write_text(path, json.dumps(plan, indent=2))
    return stale


def is_complete(out: Path, spec: ShardSpec) -> bool:
    """Both files of the shard exist (written atomically, tensors last) with the shard's rows."""
    try:
        return all(pq.read_metadata(out / sub / spec.name).num_rows == spec.n_rows for sub in SUBDIRS)
    except Exception:                     # missing or unreadable: recompute it
        return False


def _fixed_lists(values: np.ndarray, width: int, type_: pa.DataType) -> pa.Array:
    """(n, ...) array -> FixedSizeList<type_>[width] over its flat buffer (no per-row lists)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=type_), width)


def ids_table(ids: np.ndarray, hits: dict[str, tuple[np.ndarray, np.ndarray]], k: int,
              stats: dict) -> pa.Table:
    """``neighbours_schema``: {search: (scores (n, k), memory ids (n, k))}; stats in metadata."""
    schema = formats.neighbours_schema(k, sorted(hits))
    schema = schema.with_metadata({**schema.metadata, b"reco.stats": json.dumps(stats).encode()})
    cols = [pa.array(ids, type=pa.int64())]
    for search in sorted(hits):
        scores, mem_ids = hits[search]
        cols += [_fixed_lists(mem_ids.astype(np.int64, copy=False), k, pa.int64()),
                 _fixed_lists(scores.astype(np.float32, copy=False), k, pa.float32())]
    return pa.Table.from_arrays(cols, schema=schema)


def tensors_table(ids: np.ndarray, v: np.ndarray, t: np.ndarray, blocks: dict[str, np.ndarray],
                  dim: int, k: int, fields: tuple[str, ...]) -> pa.Table:
    """``tensors_schema``: the pair (v, t) and each field's (n, k, dim) block, as float16 bytes."""
    cols = [pa.array(ids, type=pa.int64()), formats.encode_block(v, dim), formats.encode_block(t, dim)]
    cols += [formats.encode_block(blocks[f], dim, k) for f in fields]
    return pa.Table.from_arrays(cols, schema=formats.tensors_schema(dim, k, fields))


def _atomic_write(table: pa.Table, path: str, options: dict) -> None:
    """Local paths: pyarrow's native file (no Python file object: the encoding never takes the
    GIL, so it overlaps the next shard's search) through a temporary name, then os.replace.
    Other filesystems (gs://, s3://): reco.formats.atomic_write_table."""
    if "://" in path:
        formats.atomic_write_table(table, path, **options)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_shard(out: str | Path, name: str, tables: dict[str, pa.Table]) -> None:
    """Write {"ids": table, "tensors": table} atomically, tensors last (see is_complete)."""
    for sub in SUBDIRS:
        _atomic_write(tables[sub], os.path.join(str(out), sub, name), WRITE_OPTIONS[sub])


def read_ids(path: str | Path, k: int | None = None) -> pa.Table:
    """A neighbour-ids shard (``reco.formats.neighbours_schema``), validated against its own
    metadata: ``reco.k`` (``k`` when given: MismatchError), the ``{search}_ids/_scores`` columns
    at that k, ids non-null and unique."""
    path = str(path)
    table = formats.read_parquet(path)
    found = formats.meta_int(table.schema, "k", path)
    if found is None or found < 1:
        raise FormatError(f"{path}: no reco.k metadata (not a neighbours shard?)")
    if k is not None:
        check_dim(found, k, path, what="k")
    searches = sorted({n.rsplit("_", 1)[0] for n in table.schema.names
                       if n.endswith("_ids") or n.endswith("_scores")})
    if not searches:
        raise FormatError(f"{path}: no '<search>_ids' columns")
    formats.check_columns(table.schema, formats.neighbours_schema(found, searches), path)
    check_ids(table.column("id"), path)
    return table


def shard_stats(out: Path, name: str) -> dict:
    """The exclusion counts an ids shard records in its ``reco.stats`` metadata (FormatError
    naming the shard when they are unreadable)."""
    path = out / "ids" / name
    try:
        stats = json.loads((pq.read_schema(path).metadata or {}).get(b"reco.stats", b"{}"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: unreadable reco.stats metadata ({exc}); rerun "
                          f"`reco precompute-neighbours --force`") from exc
    if not isinstance(stats, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in stats.values()):
        raise FormatError(f"{path}: reco.stats metadata {stats!r} is not an object of counts")
    return stats


def write_manifests(out: Path, specs: list[ShardSpec], info: dict) -> dict:
    """List the complete shards (all of them, or FormatError) in ids/ and tensors/ manifests."""
    missing = [s.name for s in specs if not is_complete(out, s)]
    if missing:
        raise FormatError(f"{out}: {len(missing)} shard(s) missing after the run, first "
                          f"{missing[0]}; run precompute-neighbours again to resume")
    counts = {s.name: s.n_rows for s in specs}
    counts["total"] = sum(s.n_rows for s in specs)
    stats = {"n_excluded": 0, "n_missing": 0}
    for s in specs:
        for key, value in shard_stats(out, s.name).items():
            stats[key] = stats.get(key, 0) + value
    info = {**info, **stats}
    for sub, kind in zip(SUBDIRS, ("neighbours", "tensors")):
        formats.Manifest(kind=kind, shards=[s.name for s in specs], counts=counts, info=info).write(out / sub)
    return info


def check_listed_shards(folder: str | Path) -> formats.Manifest:
    """Read a neighbours/tensors manifest and check that every listed shard is on disk."""
    manifest = formats.Manifest.read(folder)
    for path in manifest.shard_paths(folder):
        if not os.path.exists(path):
            raise FormatError(f"{folder}/manifest.json lists shard {os.path.basename(path)!r}, "
                              f"which is not on disk")
    return manifest
