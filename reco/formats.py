"""On-disk formats of reco, declared once (pyarrow schemas), written atomically, validated on read.

Artefacts and where they are described:

* URL lists: Parquet/CSV/TSV with (by default) ``url`` and ``caption`` columns, like LAION/CC12M
  metadata; an optional ``label`` (int) column for class-labelled evaluation sets.
* Embedded shards (:func:`embedded_schema`): one row per URL-list row, whatever happened to it.
* Neighbour shards (:func:`neighbours_schema`) and trainer tensors (:func:`tensors_schema`, format
  ``tensors/2``: float16 blocks as fixed-size binary, :func:`encode_block` / :func:`decode_block`);
  written by ``reco.pipelines.neighbours``.
* Manifests (:class:`Manifest`): JSON beside a shard folder listing only complete shards.

Every writer goes through :func:`atomic_write_table` / :func:`atomic_write_text`: data is written
to a temporary name in the same folder and renamed, so a reader never sees a half-written file.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError

# Status of a URL after the download/embed job.
STATUS_OK = "success"
STATUSES = (STATUS_OK, "failed_to_download", "failed_to_resize", "refused", "failed_to_embed")


def embedding_type(dim: int) -> pa.DataType:
    """Embeddings are stored as fixed-size lists of float16 (L2-normalised before the cast)."""
    return pa.list_(pa.float16(), dim)


def embedded_schema(dim: int, model: str = "", pretrained: str = "") -> pa.Schema:
    """Schema of an embedded shard. ``image_emb``/``text_emb`` are all-zero unless status == success (pyarrow cannot read back
    null fixed-size-list entries, apache/arrow#35692); readers filter on ``status``."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),       # row number in the URL list(s)
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("label", pa.int64()),                    # class id, null when unlabelled
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            pa.field("image_emb", embedding_type(dim)),
            pa.field("text_emb", embedding_type(dim)),
        ],
        metadata={b"reco.format": b"embedded/1", b"reco.model": model.encode(),
                  b"reco.pretrained": pretrained.encode(), b"reco.dim": str(dim).encode()},
    )


def to_fp16_list(vectors: np.ndarray, dim: int) -> pa.Array:
    """(n, dim) float array -> FixedSizeList<float16> array (pyarrow refuses float32 -> f16)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise FormatError(f"expected embeddings of shape (n, {dim}), got {vectors.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float16()), dim)


def from_fp16_list(column: pa.Array | pa.ChunkedArray, dim: int, dtype=np.float32) -> np.ndarray:
    """FixedSizeList<float16> column (no nulls) -> (n, dim) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise FormatError("embedding column has null rows; filter on status first")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_table(table: pa.Table, path: str | Path, **parquet_kwargs: Any) -> None:
    """Write a Parquet file so that ``path`` either does not exist or is complete."""
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = _tmp_name(fs_path)
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, **parquet_kwargs)
        fs.mv(tmp, fs_path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = _tmp_name(fs_path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, fs_path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save_npy(array: np.ndarray, path: str | Path) -> None:
    """np.save through a temporary file (local paths; for memory-mapped reading)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# validated reads
# ---------------------------------------------------------------------------------------------

def read_parquet(path: str | Path, required: pa.Schema | list[str] | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file; a corrupt file or a missing/ill-typed column raises FormatError
    naming the file."""
    path = str(path)
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except (pa.ArrowException, OSError, EOFError, ValueError, IndexError) as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    if required is not None:
        check_columns(table.schema, required, path)
    return table


def check_columns(schema: pa.Schema, required: pa.Schema | list[str], where: str) -> None:
    if isinstance(required, pa.Schema):
        for fld in required:
            if fld.name not in schema.names:
                raise FormatError(f"{where}: missing column {fld.name!r} (has {schema.names})")
            got = schema.field(fld.name).type
            if not got.equals(fld.type):
                raise FormatError(f"{where}: column {fld.name!r} has type {got}, expected {fld.type}")
    else:
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise FormatError(f"{where}: missing column(s) {missing} (has {schema.names})")


def check_finite(vectors: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise FormatError(f"{where}: {int(bad.sum())} vector(s) contain NaN/inf, first at row "
                          f"{int(np.argmax(bad))}")


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------

@dataclass
class Manifest:
    """What a shard folder holds. Only complete shards are listed; written atomically."""

    kind: str                                   # "embedded", "neighbours", ...
    shards: list[str] = field(default_factory=list)   # file names relative to the folder
    counts: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    FILE = "manifest.json"

    def write(self, folder: str | Path) -> None:
        atomic_write_text(os.path.join(str(folder), self.FILE), json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, folder: str | Path, kind: str | None = None) -> "Manifest":
        path = os.path.join(str(folder), cls.FILE)
        try:
            with fsspec.open(path, "r") as f:
                data = json.load(f)
            manifest = cls(**data)
        except FileNotFoundError as exc:
            raise FormatError(f"{path}: no manifest; has the previous stage run?") from exc
        except (ValueError, TypeError) as exc:         # bad JSON/UTF-8, not an object, bad keys
            raise FormatError(f"{path}: corrupt manifest ({exc})") from exc
        _validate_manifest(manifest, path)
        if kind is not None and manifest.kind != kind:
            raise FormatError(f"{path}: manifest of kind {manifest.kind!r}, expected {kind!r}")
        return manifest

    def shard_paths(self, folder: str | Path) -> list[str]:
        return [safe_join(folder, s, f"{folder}/{self.FILE}: shard") for s in self.shards]


# ---------------------------------------------------------------------------------------------
# neighbours and trainer tensors
# ---------------------------------------------------------------------------------------------
# A "context field" names what is retrieved for a query: f"{query}_{search}_{fuse}", where query is
# "v" (image embedding) or "t" (text embedding), search is the memory index searched ("img" or
# "txt") and fuse the modality of the memory embeddings that are fused ("img" or "txt").
#   v_img_txt  image -> nearest memory images -> their texts     (RECO default, image side)
#   t_txt_img  text  -> nearest memory texts  -> their images    (RECO default, text side)
#   v_img_img / t_txt_txt                                         (uni-modal fusion ablation)
#   v_txt_txt / t_img_img                                         (cross-modal search ablation)
#   v_txt_img / t_img_txt                                         (cross search + uni fusion)
MODALITIES = {"img": "image", "txt": "text"}
DEFAULT_FIELDS = ("v_img_txt", "t_txt_img")


def parse_field(name: str) -> tuple[str, str, str]:
    """'v_img_txt' -> ('v', 'img', 'txt'); raises FormatError for anything else."""
    parts = name.split("_")
    if len(parts) != 3 or parts[0] not in ("v", "t") or parts[1] not in MODALITIES or parts[2] not in MODALITIES:
        raise FormatError(f"bad context field {name!r}: expected '{{v|t}}_{{img|txt}}_{{img|txt}}'")
    return parts[0], parts[1], parts[2]


def search_keys(fields: tuple[str, ...]) -> list[str]:
    """The distinct searches ("v_img", "t_txt", ...) that a set of context fields needs."""
    return sorted({"_".join(parse_field(f)[:2]) for f in fields})


def neighbours_schema(k: int, searches: list[str]) -> pa.Schema:
    """Neighbour ids/scores per training pair: for each search s (e.g. "v_img"), ``{s}_ids``
    (memory ids, -1 = none) and ``{s}_scores`` (inner products), best first, length k."""
    cols = [pa.field("id", pa.int64(), nullable=False)]
    for s in searches:
        cols += [pa.field(f"{s}_ids", pa.list_(pa.int64(), k)),
                 pa.field(f"{s}_scores", pa.list_(pa.float32(), k))]
    return pa.schema(cols, metadata={b"reco.format": b"neighbours/1", b"reco.k": str(k).encode()})


# Trainer tensors, format 2 (``reco.format`` = ``tensors/2`` in the schema metadata).
#
#   column      Arrow type                     value of one row (one training pair)
#   id          int64 (not null)               the pair's id (row of the embedded train split)
#   v, t        fixed_size_binary(2 * dim)     the pair's image / text embedding: dim float16
#   <field>     fixed_size_binary(2 * k * dim) the field's (k, dim) block of retrieved memory
#                                              embeddings, row-major (neighbour j = bytes
#                                              [2*j*dim, 2*(j+1)*dim)), best neighbour first
#
# Every vector value is IEEE 754 binary16, little-endian, with no padding: the column's data buffer
# is exactly the C-contiguous ``np.dtype("<f2")`` array of shape (n, k, dim) (k = 1 for v, t), so
# :func:`encode_block` / :func:`decode_block` convert without copying. Missing neighbours (memory
# smaller than k) are zero rows. No nulls. Metadata: ``reco.dim``, ``reco.k``, ``reco.fields``
# (comma-separated). Format 1 (``tensors/1``) stored the same values as FixedSizeList<float16>,
# which Parquet encodes and decodes value by value, while a fixed-size binary value is one memcpy
# (20k pairs, k=16, dim=64, 2 fields, 83 MiB: 0.7-0.9 CPU-s to write as lists vs 0.05 as
# fixed-size binary, 0.23 vs 0.011 CPU-s to read). Format-1 shards are refused with a
# FormatError that says to rerun ``reco precompute-neighbours --force``.
TENSORS_FORMAT = "tensors/2"
FP16_LE = np.dtype("<f2")


def block_type(dim: int, k: int = 1) -> pa.DataType:
    """Arrow type of a (k, dim) float16 block per row: fixed-size binary of 2*k*dim bytes."""
    return pa.binary(2 * k * dim)


def tensors_schema(dim: int, k: int, fields: tuple[str, ...]) -> pa.Schema:
    """What the trainer streams (format ``tensors/2``, layout above): per pair ``id``, ``v`` and
    ``t`` (dim float16) and each context field's (k, dim) float16 block."""
    cols = [pa.field("id", pa.int64(), nullable=False),
            pa.field("v", block_type(dim)), pa.field("t", block_type(dim))]
    cols += [pa.field(f, block_type(dim, k)) for f in fields]
    meta = {b"reco.format": TENSORS_FORMAT.encode(), b"reco.dim": str(dim).encode(),
            b"reco.k": str(k).encode(), b"reco.fields": ",".join(fields).encode()}
    return pa.schema(cols, metadata=meta)


def encode_block(values: np.ndarray, dim: int, k: int = 1) -> pa.FixedSizeBinaryArray:
    """(n, k, dim) (or flat (n, k*dim)) float array -> the :func:`block_type` column: one
    fixed-size binary value per row over the little-endian float16 buffer (no copy when
    ``values`` is already C-contiguous ``<f2``; the array keeps a reference to it)."""
    values = np.ascontiguousarray(values, dtype=FP16_LE)
    if values.ndim < 2 or values.shape[1:] not in ((k, dim), (k * dim,)):
        raise FormatError(f"expected a block of shape (n, {k}, {dim}) or (n, {k * dim}), got {values.shape}")
    n = values.shape[0]
    return pa.FixedSizeBinaryArray.from_buffers(block_type(dim, k), n, [None, pa.py_buffer(values)])


def decode_block(column: pa.Array | pa.ChunkedArray, dim: int, k: int = 1,
                 where: str = "tensors column") -> np.ndarray:
    """A :func:`block_type` column -> read-only (n, k, dim) ``<f2`` array viewing its data buffer
    (slices honoured; several chunks are concatenated). A column of another type (a format-1
    float16 list included) or with nulls is a FormatError naming ``where``."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            parts = [decode_block(c, dim, k, where) for c in column.chunks]
            return _read_only(np.concatenate(parts) if parts else np.zeros((0, k, dim), FP16_LE))
        column = column.chunk(0)
    want = block_type(dim, k)
    if not column.type.equals(want):
        old = pa.types.is_fixed_size_list(column.type) and pa.types.is_float16(column.type.value_type)
        raise FormatError(f"{where} has type {column.type}, expected {want}"
                          + (f"; {OLD_TENSORS_HINT}" if old else ""))
    if column.null_count:
        raise FormatError(f"{where} has {column.null_count} null row(s)")
    n = len(column)
    if n == 0:
        return _read_only(np.zeros((0, k, dim), FP16_LE))
    try:
        flat = np.frombuffer(column.buffers()[1], dtype=FP16_LE, count=n * k * dim,
                             offset=column.offset * want.byte_width)
    except (ValueError, TypeError) as exc:              # buffer shorter than the column says
        raise FormatError(f"{where} has a bad data buffer ({exc})") from exc
    return _read_only(flat.reshape(n, k, dim))          # a view of Arrow's immutable data


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


OLD_TENSORS_HINT = ("trainer tensors of format tensors/1 (float16 lists), which this version no "
                    "longer reads: rerun `reco precompute-neighbours --force`")


def check_tensors_format(schema: pa.Schema, where: str) -> None:
    """FormatError naming ``where`` unless ``schema`` is a format-2 tensors schema: format 1 (by
    its metadata, or float16 list columns) says to rerun precompute-neighbours; another
    ``reco.format`` is refused. Without ``reco.format`` the columns' types decide
    (:func:`check_columns`)."""
    raw = (schema.metadata or {}).get(b"reco.format")
    list_cols = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)
                 and pa.types.is_float16(f.type.value_type)]
    if raw == b"tensors/1" or (raw is None and list_cols):
        raise FormatError(f"{where}: {OLD_TENSORS_HINT}")
    if raw is not None and raw != TENSORS_FORMAT.encode():
        raise FormatError(f"{where}: reco.format is {raw!r}, expected {TENSORS_FORMAT!r} "
                          f"(not a trainer tensors shard?)")


# ---------------------------------------------------------------------------------------------
# file names read from artefacts or derived from data (validated readers: reco/validate.py)
# ---------------------------------------------------------------------------------------------

def safe_name(name: Any, where: str) -> str:
    """A plain file name (no folder part, no ``..``, no NUL): what may be joined to an output or
    shard folder. Names read from manifests or derived from URLs/captions go through this."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise FormatError(f"{where}: {name!r} is not a plain file name (it could escape its folder)")
    return name


def safe_join(folder: str | Path, name: Any, where: str | None = None) -> str:
    """``folder/name`` for a :func:`safe_name` ``name`` (FormatError otherwise)."""
    return os.path.join(str(folder), safe_name(name, where or str(folder)))


def _validate_manifest(manifest: "Manifest", path: str) -> "Manifest":
    if not isinstance(manifest.kind, str):
        raise FormatError(f"{path}: manifest 'kind' must be a string, got {manifest.kind!r}")
    if not isinstance(manifest.shards, list):
        raise FormatError(f"{path}: manifest 'shards' must be a list of file names")
    for name in manifest.shards:
        safe_name(name, f"{path}: shard")
    if not isinstance(manifest.counts, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in manifest.counts.items()):
        raise FormatError(f"{path}: manifest 'counts' must map names to integers")
    if not isinstance(manifest.info, dict):
        raise FormatError(f"{path}: manifest 'info' must be an object")
    return manifest


def remove_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporaries (``.<name>.tmp-<hex>`` files or folders) that writers killed
    before their rename left in ``folder`` (local, not recursive); returns their names. Call it
    only when no writer of that folder can be running (a stage's driver, before it starts)."""
    import shutil

    removed = []
    for path in sorted(Path(folder).glob(".*.tmp-*")) if Path(folder).is_dir() else []:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
