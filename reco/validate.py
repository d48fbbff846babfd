"""Validated reading of reco's artefacts: one :class:`~reco.errors.FormatError` (or
:class:`~reco.errors.MismatchError`) naming the file, never a raw pyarrow/json/KeyError traceback.

Formats are declared in :mod:`reco.formats`; these readers check a file against its declaration:

* :func:`read_embedded` / :func:`read_neighbours` / :func:`read_tensors`: Parquet shards (schema
  from the file's own ``reco.*`` metadata, compared with what the caller expects: ``dim``, ``k``);
  ids unique and non-null; statuses known; vectors finite;
* :func:`read_json`: JSON objects with typed required keys (index ``info.json``:
  :data:`INDEX_INFO_KEYS`, ``heads.json``: :data:`HEADS_META_KEYS`, checkpoint ``state.json``);
* :func:`load_npy`: ``.npy`` arrays without pickles, dtype/ndim checked;
* :func:`check_dim`, :func:`check_same_model`, :func:`check_config_match`, :func:`check_vectors`:
  the mismatch checks a stage runs before any work.

Manifests (:meth:`reco.formats.Manifest.read`) and URL lists
(:func:`reco.pipelines.urls.inspect_url_files`) validate themselves. ``tests/test_formats_properties.py``
throws random corruption, truncation and wrong types at every reader.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from reco.errors import FormatError, MismatchError
from reco.formats import (STATUS_OK, STATUSES, VECTOR_COLUMNS, check_columns, check_finite,
                          check_tensors_format, decode_block, decode_vectors, embedded_dim,
                          embedded_schema, neighbours_schema, parse_field, read_parquet,
                          tensors_schema)

READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, pa.ArrowException)
INDEX_INFO_KEYS = {"model_id": str, "dim": int, "n": int}
CHECKPOINT_STATE_KEYS = {"step": int, "train": dict, "world_size": int, "data": dict,
                         "optimizer": dict}
# ``fields`` is informative (the model reads the contexts from ``train``), so not required
HEADS_META_KEYS = {"dim": int, "k": int, "model_id": str, "fusion": str, "sides": list,
                   "train": dict}


def read_json(path: str | Path, required: dict[str, type | tuple] | None = None) -> dict:
    """A JSON object from ``path`` with ``required`` keys of the given types (int accepts no bool)."""
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, typ in (required or {}).items():
        if key not in data:
            raise FormatError(f"{path}: missing key {key!r}")
        value = data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, float)):
            raise FormatError(f"{path}: key {key!r} is {value!r}, expected {getattr(typ, '__name__', typ)}")
    return data


def load_npy(path: str | Path, *, dtype: Any = None, ndim: int | None = None, mmap: bool = False) -> np.ndarray:
    """np.load without pickles; a corrupt file, object array, wrong dtype/ndim -> FormatError."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError...
        raise FormatError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise FormatError(f"{path}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and array.ndim != ndim:
        raise FormatError(f"{path}: shape {array.shape}, expected {ndim} dimension(s)")
    return array


def check_dim(got: int, expected: int, where: str, what: str = "embedding dimension") -> None:
    if int(got) != int(expected):
        raise MismatchError(f"{where}: {what} {got}, expected {expected} (artefacts of another model?)")


def check_same_model(got: str | None, expected: str | None, where: str) -> None:
    """MismatchError when two recorded model ids differ (an empty id is not compared)."""
    if got and expected and got != expected:
        raise MismatchError(f"{where}: made with model {got!r}, expected {expected!r}; rebuild it "
                            f"with the same model")


def check_config_match(saved: dict, current: dict, where: str, ignore: tuple[str, ...] = ()) -> None:
    """MismatchError naming every key whose value differs between a saved config (e.g. a
    checkpoint's) and the current one."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} != now {current.get(k)!r}" for k in diff[:5])
        raise MismatchError(f"{where}: config does not match ({detail})")


def check_vectors(vectors: Any, dim: int, where: str) -> np.ndarray:
    """(n, dim) finite float32 array, or FormatError (wrong shape/dimension, NaN/inf row)."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{where}: not a numeric array ({exc})") from exc
    if array.ndim != 2 or array.shape[1] != dim:
        raise FormatError(f"{where}: vectors of shape {array.shape}, expected (n, {dim}) "
                          f"(wrong embedding dimension?)")
    check_finite(array, where)
    return array


def _meta_int(schema: pa.Schema, key: bytes, path: str) -> int | None:
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        return None
    try:
        return int(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: bad {key.decode()} metadata {raw!r}") from exc


def _check_ids(table: pa.Table, path: str) -> None:
    ids = table.column("id")
    if ids.null_count:
        raise FormatError(f"{path}: column 'id' has {ids.null_count} null(s)")
    values = ids.to_numpy()
    if len(np.unique(values)) != len(values):
        raise FormatError(f"{path}: duplicate ids")


def read_embedded(path: str | Path, dim: int | None = None) -> pa.Table:
    """An embedded shard, validated: format ``embedded/2`` (``embedded/1``: rerun embed-memory
    --force), schema (dimension from the file's metadata and column widths, checked against
    ``dim``), ids unique and non-null, statuses known, success rows' embeddings finite."""
    path = str(path)
    table = read_parquet(path)
    found = embedded_dim(table.schema, path)
    if found < 1:
        raise FormatError(f"{path}: no embedding dimension (not an embedded shard?)")
    if dim is not None:
        check_dim(found, dim, path)
    check_columns(table.schema, embedded_schema(found), path)
    _check_ids(table, path)
    status = table.column("status").to_pylist()
    unknown = [i for i, s in enumerate(status) if s not in STATUSES]
    if unknown:
        raise FormatError(f"{path}: row {unknown[0]}: unknown status {status[unknown[0]]!r}")
    ok = np.flatnonzero(np.array([s == STATUS_OK for s in status], dtype=bool))
    for name in VECTOR_COLUMNS:
        column = table.column(name).take(pa.array(ok, pa.int64()))
        if column.null_count:
            raise FormatError(f"{path}: column {name!r} has null rows")
        check_finite(decode_vectors(column, found, where=f"{path}: column {name!r}"),
                     f"{path}: column {name!r}", rows=ok)
    return table


def read_neighbours(path: str | Path, k: int | None = None) -> pa.Table:
    """A neighbour-ids shard (:func:`neighbours_schema`), validated against its own metadata."""
    path = str(path)
    table = read_parquet(path)
    found = _meta_int(table.schema, b"reco.k", path)
    if found is None or found < 1:
        raise FormatError(f"{path}: no reco.k metadata (not a neighbours shard?)")
    if k is not None:
        check_dim(found, k, path, what="k")
    searches = sorted({n.rsplit("_", 1)[0] for n in table.schema.names
                       if n.endswith("_ids") or n.endswith("_scores")})
    if not searches:
        raise FormatError(f"{path}: no '<search>_ids' columns")
    check_columns(table.schema, neighbours_schema(found, searches), path)
    _check_ids(table, path)
    return table


def read_tensors(path: str | Path, dim: int | None = None, k: int | None = None) -> pa.Table:
    """A trainer tensors shard (:func:`tensors_schema`), validated: format version (``tensors/1``
    shards: rerun precompute-neighbours), schema from its metadata, ids, every vector finite."""
    path = str(path)
    table = read_parquet(path)
    check_tensors_format(table.schema, path)
    meta = table.schema.metadata or {}
    found_dim, found_k = _meta_int(table.schema, b"reco.dim", path), _meta_int(table.schema, b"reco.k", path)
    if not found_dim or not found_k or found_dim < 1 or found_k < 1:
        raise FormatError(f"{path}: no reco.dim/reco.k metadata (not a tensors shard?)")
    if dim is not None:
        check_dim(found_dim, dim, path)
    if k is not None:
        check_dim(found_k, k, path, what="k")
    try:
        fields = tuple(f for f in meta.get(b"reco.fields", b"").decode().split(",") if f)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: bad reco.fields metadata") from exc
    for name in fields:
        parse_field(name)
    check_columns(table.schema, tensors_schema(found_dim, found_k, fields), path)
    _check_ids(table, path)
    for name, k in [("v", 1), ("t", 1)] + [(f, found_k) for f in fields]:
        values = decode_block(table.column(name), found_dim, k, f"{path}: column {name!r}")
        check_finite(values.reshape(len(values), k * found_dim), f"{path}: column {name!r}")
    return table
