"""On-disk formats of reco, declared once (pyarrow schemas), written atomically, validated on read.

Artefacts and where they are described:

* URL lists: Parquet/CSV/TSV with (by default) ``url`` and ``caption`` columns, like LAION/CC12M
  metadata; an optional ``label`` (int) column for class-labelled evaluation sets.
* Embedded shards (:func:`embedded_schema`, format ``embedded/2``): one row per URL-list row,
  whatever happened to it; embeddings as float16 fixed-size binary (:func:`encode_vectors` /
  :func:`decode_vectors`).
* Neighbour shards (:func:`neighbours_schema`) and trainer tensors (:func:`tensors_schema`, format
  ``tensors/2``: float16 blocks as fixed-size binary, :func:`encode_block` / :func:`decode_block`);
  written by ``reco.pipelines.neighbours``.
* Manifests (:class:`Manifest`): JSON beside a shard folder listing only complete shards.

Every writer goes through :func:`atomic_write_table` / :func:`atomic_write_text`: data is written
to a temporary name in the same folder and renamed, so a reader never sees a half-written file
(those and the safe file names live in :mod:`reco.storage` and are re-exported here).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.storage import (atomic_save_npy, atomic_write_bytes, atomic_write_table,  # noqa: F401
                          atomic_write_text, remove_temporaries, safe_join, safe_name)

# Status of a URL after the download/embed job.
STATUS_OK = "success"
STATUSES = (STATUS_OK, "failed_to_download", "failed_to_resize", "refused", "failed_to_embed")


# ---------------------------------------------------------------------------------------------
# embedded shards
# ---------------------------------------------------------------------------------------------
# Embedded shards, format 2 (``reco.format`` = ``embedded/2`` in the schema metadata).
#
#   column              Arrow type                  value of one row (one row of the URL list(s))
#   id                  int64 (not null)            row number in the URL list(s)
#   url, caption        string
#   label               int64                       class id, null when unlabelled
#   status              string (not null)           one of STATUSES
#   error_message       string                      why the row failed, null on success
#   image_emb, text_emb fixed_size_binary(2 * dim)  the L2-normalised embedding: dim IEEE 754
#                                                   binary16 values, little-endian, no padding
#
# The vector columns have the layout of the trainer tensors' ``v``/``t`` (:func:`block_type`,
# k = 1): :func:`encode_vectors` / :func:`decode_vectors`. Rows whose status is not ``success``
# hold all-zero vectors, not nulls (a whole column decodes without a validity mask); readers filter
# on ``status``. Metadata: ``reco.dim`` (= byte width / 2, checked), ``reco.model``,
# ``reco.pretrained``. Without reco (pandas), a column decodes as
#     emb = np.frombuffer(b"".join(df["image_emb"]), dtype="<f2").reshape(len(df), -1)
# Format 1 (``embedded/1``) stored FixedSizeList<float16>, which pyarrow decodes value by value
# (100k rows x 64-d, both columns: ~0.33 s vs ~0.05 s as fixed-size binary); format-1 shards are
# refused with a FormatError that says to rerun ``reco embed-memory --force``.
EMBEDDED_FORMAT = "embedded/2"
VECTOR_COLUMNS = ("image_emb", "text_emb")
OLD_EMBEDDED_HINT = ("embedded shard of format embedded/1 (float16 lists), which this version no "
                     "longer reads: rerun `reco embed-memory --force` (same inputs and output)")


def embedded_schema(dim: int, model: str = "", pretrained: str = "") -> pa.Schema:
    """Schema of an embedded shard (format ``embedded/2``, layout above). Rows whose status is
    not ``success`` hold all-zero vectors, not nulls; readers filter on ``status``."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("label", pa.int64()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            pa.field("image_emb", block_type(dim)),
            pa.field("text_emb", block_type(dim)),
        ],
        metadata={b"reco.format": EMBEDDED_FORMAT.encode(), b"reco.model": model.encode(),
                  b"reco.pretrained": pretrained.encode(), b"reco.dim": str(dim).encode()},
    )


def encode_vectors(vectors: np.ndarray, dim: int) -> pa.FixedSizeBinaryArray:
    """(n, dim) float array -> an embedded vector column (float16 bytes, :func:`encode_block`)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise FormatError(f"expected embeddings of shape (n, {dim}), got {vectors.shape}")
    return encode_block(vectors, dim)


def decode_vectors(column: pa.Array | pa.ChunkedArray, dim: int, dtype=np.float32,
                   where: str = "embedding column") -> np.ndarray:
    """An embedded vector column (no nulls: filter on status first) -> (n, dim) array of
    ``dtype`` (float16: a read-only view of the Arrow buffer). Another type (an ``embedded/1``
    float16 list: with the rerun advice) is a FormatError naming ``where``."""
    half = decode_block(column, dim, 1, where, hint=OLD_EMBEDDED_HINT)[:, 0]
    return half if np.dtype(dtype) == FP16_LE else to_float32(half).astype(dtype, copy=False)


def check_embedded_format(schema: pa.Schema, where: str) -> None:
    """FormatError naming ``where`` unless ``schema`` is of format ``embedded/2``: format 1 (by
    its metadata, or float16 list vector columns) says to rerun embed-memory --force."""
    _check_format(schema, where, EMBEDDED_FORMAT, "embedded/1", OLD_EMBEDDED_HINT,
                  "an embedded shard", VECTOR_COLUMNS)


def embedded_dim(schema: pa.Schema, where: str) -> int:
    """The dimension of an embedded shard, from its ``reco.dim`` metadata and the byte width of
    its vector columns, which must agree (2 * dim); 0 when neither says. The format is checked
    first (:func:`check_embedded_format`); FormatError naming ``where`` on any disagreement."""
    check_embedded_format(schema, where)
    raw, dim = meta_text(schema, "dim", where), meta_int(schema, "dim", where) or 0
    if raw is not None and dim < 1:
        raise FormatError(f"{where}: bad reco.dim metadata {raw!r}")
    for name in VECTOR_COLUMNS:
        i = schema.get_field_index(name)
        typ = schema.field(i).type if i >= 0 else None
        if typ is None or not pa.types.is_fixed_size_binary(typ):
            continue                                    # missing or another type: check_columns
        if typ.byte_width % 2 or (dim and typ.byte_width != 2 * dim):
            raise FormatError(f"{where}: column {name!r} has type {typ}, expected "
                              f"{block_type(dim) if dim else 'an even byte width'} "
                              f"(reco.dim = {dim or 'absent'}: 2 bytes per float16 value)")
        dim = dim or typ.byte_width // 2
    return dim


# ---------------------------------------------------------------------------------------------
# validated reads
# ---------------------------------------------------------------------------------------------

def meta_text(schema: pa.Schema, key: str, where: str) -> str | None:
    """The ``reco.<key>`` metadata of a shard's schema as text (None when absent); bytes that
    are not UTF-8 are a FormatError naming ``where``. The one parser of shard metadata."""
    raw = (schema.metadata or {}).get(f"reco.{key}".encode())
    try:
        return raw.decode() if raw is not None else None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: bad reco.{key} metadata {raw!r}") from exc


def meta_int(schema: pa.Schema, key: str, where: str) -> int | None:
    """The integer ``reco.<key>`` metadata (``dim``, ``k``) of a shard's schema; None when absent
    or empty; anything else than an integer is a FormatError naming ``where``."""
    text = meta_text(schema, key, where)
    try:
        return int(text) if text else None
    except ValueError as exc:
        raise FormatError(f"{where}: bad reco.{key} metadata {text!r}") from exc


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


def check_finite(vectors: np.ndarray, where: str, rows: np.ndarray | None = None) -> None:
    """FormatError naming ``where`` and the first row (``rows[i]`` for vector i when given: the
    vectors' rows in the file) of any vector holding a NaN/inf."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        raise FormatError(f"{where}: {int(bad.sum())} vector(s) contain NaN/inf, first at row "
                          f"{int(rows[first]) if rows is not None else first}")


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
CONTEXT_FIELDS = tuple(f"{q}_{s}_{f}" for q in "vt" for s in MODALITIES for f in MODALITIES)
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
                 where: str = "tensors column", hint: str | None = None) -> np.ndarray:
    """A :func:`block_type` column -> read-only (n, k, dim) ``<f2`` array viewing its data buffer
    (slices honoured; several chunks are concatenated). A column of another type or with nulls
    is a FormatError naming ``where``; for a float16 list (a format-1 column) it ends with
    ``hint`` (default :data:`OLD_TENSORS_HINT`)."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            parts = [decode_block(c, dim, k, where, hint) for c in column.chunks]
            return _read_only(np.concatenate(parts) if parts else np.zeros((0, k, dim), FP16_LE))
        column = column.chunk(0)
    want = block_type(dim, k)
    if not column.type.equals(want):
        raise FormatError(f"{where} has type {column.type}, expected {want}"
                          + (f"; {hint or OLD_TENSORS_HINT}" if _is_fp16_list(column.type) else ""))
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


def _is_fp16_list(typ: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(typ) and pa.types.is_float16(typ.value_type)


# float16 -> float32 through a 256 KiB table: exact, and ~2x faster than numpy's astype
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


_F16_CHUNK = 1 << 20       # values per lookup: bounds its int64 index temporary to 8 MiB


def to_float32(x: np.ndarray) -> np.ndarray:
    """A float16 array as a new float32 array (exact); other dtypes through astype. The table
    lookup runs chunk by chunk (one lookup of the whole array held an int64 index of it: 4x the
    float16 input beside the output)."""
    if x.dtype != np.float16:
        return x.astype(np.float32)
    flat = np.ascontiguousarray(x).view(np.uint16).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    for start in range(0, flat.size, _F16_CHUNK):
        np.take(_F16_TO_F32, flat[start:start + _F16_CHUNK], out=out[start:start + _F16_CHUNK])
    return out.reshape(x.shape)


OLD_TENSORS_HINT = ("trainer tensors of format tensors/1 (float16 lists), which this version no "
                    "longer reads: rerun `reco precompute-neighbours --force`")


def check_tensors_format(schema: pa.Schema, where: str) -> None:
    """FormatError naming ``where`` unless ``schema`` is a format-2 tensors schema: format 1 (by
    its metadata, or float16 list columns) says to rerun precompute-neighbours; another
    ``reco.format`` is refused. Without ``reco.format`` the columns' types decide
    (:func:`check_columns`)."""
    _check_format(schema, where, TENSORS_FORMAT, "tensors/1", OLD_TENSORS_HINT,
                  "a trainer tensors shard", None)


def _check_format(schema: pa.Schema, where: str, current: str, old: str, hint: str, what: str,
                  vector_columns: tuple[str, ...] | None) -> None:
    """``reco.format`` == ``old``, or absent with float16 list columns among ``vector_columns``
    (None: any column): FormatError ``{where}: {hint}``; another format than ``current`` is
    refused too."""
    raw = (schema.metadata or {}).get(b"reco.format")
    lists = [f.name for f in schema if _is_fp16_list(f.type)
             and (vector_columns is None or f.name in vector_columns)]
    if raw == old.encode() or (raw is None and lists):
        raise FormatError(f"{where}: {hint}")
    if raw is not None and raw != current.encode():
        raise FormatError(f"{where}: reco.format is {raw!r}, expected {current!r} (not {what}?)")
