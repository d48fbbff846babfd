"""Output shards of the neighbour pass: planning, resume and manifests (no Beam, no faiss).

The format itself is documented in ``reco.pipelines.neighbours``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from reco import formats
from reco.errors import FormatError
from reco.index.embedded import EmbeddedSplit, success_count

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"
SUBDIRS = ("ids", "tensors")


@dataclass(frozen=True)
class ShardSpec:
    name: str                                   # output file name, e.g. part-00000.parquet
    slices: tuple[tuple[str, int, int], ...]    # (input shard, start, stop) over its success rows
    n_rows: int


def plan_shards(split: EmbeddedSplit, shard_size: int) -> list[ShardSpec]:
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


def reset_if_stale(out: Path, plan: dict) -> bool:
    """Remove previous shards computed from other inputs/options; record the plan. True if reset."""
    path = out / PLAN_FILE
    old = json.loads(path.read_text()) if path.exists() else None
    stale = old is not None and old.get("fingerprint") != plan["fingerprint"]
    if stale or old is None:
        for sub in SUBDIRS:
            folder = out / sub
            for f in folder.glob("*.parquet") if folder.exists() else []:
                f.unlink()
            (folder / formats.Manifest.FILE).unlink(missing_ok=True)
        if stale:
            log.warning("%s: inputs or options changed since the last run; recomputing all shards", out)
    formats.atomic_write_text(path, json.dumps(plan, indent=2))
    return stale


def is_complete(out: Path, spec: ShardSpec) -> bool:
    """Both files of the shard exist (they are written atomically, tensors last) with its rows."""
    tensors = out / "tensors" / spec.name
    if not (out / "ids" / spec.name).exists() or not tensors.exists():
        return False
    try:
        return pq.read_metadata(tensors).num_rows == spec.n_rows
    except Exception:                     # unreadable: recompute it
        return False


def shard_stats(out: Path, name: str) -> dict:
    meta = pq.read_schema(out / "ids" / name).metadata or {}
    return json.loads(meta.get(b"reco.stats", b"{}"))


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
