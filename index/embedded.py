"""Validated reading of embedded shards (``reco.formats.embedded_schema``) for the index stage.

Only rows with ``status == "success"`` are used. Every problem is one :class:`FormatError` naming
the file (and row): a shard listed in the manifest but missing on disk, a wrong dimension, a
null or NaN/inf embedding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reco import formats
from reco.errors import FormatError

COLUMNS = ["id", "status", "image_emb", "text_emb"]


@dataclass(frozen=True)
class EmbeddedSplit:
    folder: str
    shards: list[str]          # absolute paths, manifest order
    model_id: str
    dim: int
    manifest: formats.Manifest


def open_split(folder: str | Path, allow_empty: bool = False) -> EmbeddedSplit | None:
    """Read the manifest of an embedded folder; check that every listed shard is on disk.
    An empty folder is an error, or None with ``allow_empty``."""
    folder = str(folder)
    manifest = formats.Manifest.read(folder, kind="embedded")
    paths = manifest.shard_paths(folder)
    for path in paths:
        if not os.path.exists(path):
            raise FormatError(f"{folder}/manifest.json lists shard {os.path.basename(path)!r}, "
                              f"which is not on disk ({path}); re-run the embed stage")
    if not paths:
        if allow_empty:
            return None
        raise FormatError(f"{folder}/manifest.json lists no shards")
    meta = pq.read_schema(paths[0]).metadata or {}
    model_id = manifest.info.get("model_id") or _model_id_from_metadata(meta)
    dim = manifest.info.get("dim") or int(meta.get(b"reco.dim", b"0") or 0)
    if not dim:
        dim = pq.read_schema(paths[0]).field("image_emb").type.list_size
    return EmbeddedSplit(folder, paths, str(model_id), int(dim), manifest)


def _model_id_from_metadata(meta: dict) -> str:
    model = meta.get(b"reco.model", b"").decode()
    pretrained = meta.get(b"reco.pretrained", b"").decode()
    return f"{model}|{pretrained}" if model else ""


def success_count(path: str) -> int:
    """Number of success rows of one shard (reads only the status column)."""
    status = formats.read_parquet(path, columns=["status"]).column("status")
    return int(pc.sum(pc.equal(status, formats.STATUS_OK)).as_py() or 0)


def read_shard(path: str, dim: int, start: int = 0, stop: int | None = None,
               modalities: tuple[str, ...] = ("image", "text")) -> dict[str, np.ndarray]:
    """Success rows ``[start:stop]`` of one shard: {"id": (n,), "image": (n, dim), "text": ...}
    float32, validated (dimension, nulls, NaN/inf)."""
    cols = ["id", "status"] + [f"{m}_emb" for m in modalities]
    table = formats.read_parquet(path, columns=cols)
    expected = formats.embedding_type(dim)
    for m in modalities:
        got = table.schema.field(f"{m}_emb").type
        if not got.equals(expected):
            raise FormatError(f"{path}: column '{m}_emb' has type {got}, expected {expected} "
                              f"(dimension {dim} from the manifest)")
    rows = np.flatnonzero(table.column("status").to_numpy(zero_copy_only=False) == formats.STATUS_OK)
    rows = rows[start:stop]
    table = table.take(pa.array(rows))
    out = {"id": table.column("id").to_numpy().astype(np.int64)}
    for m in modalities:
        col = table.column(f"{m}_emb")
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise FormatError(f"{path}: row {int(rows[bad])} has status success but a null {m}_emb")
        vectors = formats.from_fp16_list(col, dim)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise FormatError(f"{path}: {int(bad.sum())} {m} embedding(s) contain NaN/inf, first "
                              f"at row {int(rows[int(np.argmax(bad))])} (id {int(out['id'][np.argmax(bad)])})")
        out[m] = vectors
    return out


def read_split(split: EmbeddedSplit, modalities: tuple[str, ...] = ("image", "text")) -> dict[str, np.ndarray]:
    """All success rows of a split, concatenated in manifest order."""
    parts = [read_shard(p, split.dim, modalities=modalities) for p in split.shards]
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    ids = out["id"]
    if len(np.unique(ids)) != len(ids):
        raise FormatError(f"{split.folder}: duplicate ids among the success rows")
    return out
