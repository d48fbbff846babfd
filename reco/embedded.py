"""The one reader of embedded shards (``reco.formats.embedded_schema``, format ``embedded/2``),
used by every stage that reads them: build-index, the neighbour pass, evaluation, REACT, and by
the property tests.

* :func:`open_split`: a split folder (manifest, run record, every shard's footer, no data);
* :func:`read_shard` / :func:`read_split`: the success rows' ids and embeddings as arrays;
* :func:`read_table`: one whole shard (or some of its columns) as a validated table.

Only rows with ``status == "success"`` carry embeddings. Every problem is one :class:`FormatError`
naming the file (and row): a shard listed in the manifest but missing on disk, a corrupt footer, a
shard of the old format ``embedded/1`` (float16 lists: rerun ``reco embed-memory --force``), a
wrong column type or dimension (all caught by :func:`open_split`, which reads every shard's
footer, never its data, before any work starts), a null or duplicate id, an unknown status, a
null, NaN/inf or all-zero embedding on a success row. Embeddings are float16 fixed-size binary,
decoded straight from the Arrow buffer (:func:`reco.formats.decode_vectors`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reco import formats
from reco.errors import FormatError, MismatchError
from reco.validate import READ_ERRORS, check_dim, check_ids


@dataclass(frozen=True)
class EmbeddedFolder:
    folder: str
    shards: list[str]          # absolute paths, manifest order
    model_id: str
    dim: int
    manifest: formats.Manifest
    digest: str = ""           # what a downstream record names it by (reco.record)


def open_split(folder: str | Path, allow_empty: bool = False) -> EmbeddedFolder | None:
    """Read the manifest of an embedded folder and the footer of every listed shard (no data):
    each shard must be on disk, readable Parquet, with the embedded columns at the split's
    dimension. An empty folder is an error, or None with ``allow_empty``."""
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
    digest = check_against_record(folder, manifest)
    schemas = [shard_schema(path) for path in paths]
    model_id = manifest.info.get("model_id") or model_id_of(schemas[0], paths[0])
    dim = _split_dim(manifest.info.get("dim"), schemas[0], folder, paths[0])
    for path, schema in zip(paths, schemas):
        check_shard_schema(schema, dim, path)
        got = model_id_of(schema, path)
        if got and model_id and got != model_id:
            raise MismatchError(f"{path}: embedded with model {got!r}, but {folder}/manifest.json "
                                f"says {model_id!r} (a shard of another model copied in?); "
                                f"rerun `reco embed-memory --force`")
    return EmbeddedFolder(folder, paths, str(model_id), dim, manifest, digest)


def check_against_record(folder: str, manifest: formats.Manifest) -> str:
    """The manifest and shards of an embedded folder against its run record: the manifest
    lists exactly the recorded shards, each with its recorded digest and rows, and the same
    model; FormatError naming the file otherwise. Without a record (a folder written by other
    tools), the manifest's own totals are checked. Returns the digest downstream records use."""
    from reco.record import Record, json_digest

    where = f"{folder}/manifest.json"
    record = Record.read(folder, "embed")
    if record is None:
        _check_manifest_totals(folder, manifest)
        return json_digest({"manifest": dataclasses.asdict(manifest)})
    if not record.complete:
        raise FormatError(f"{folder}/record.json: the embedded output is incomplete "
                          f"({len(record.outputs)} of {record.counts.get('shards_expected')} "
                          f"shards); rerun `reco embed-memory` to finish it")
    listed, recorded = set(manifest.shards), set(record.outputs)
    if listed != recorded:
        diff = sorted(recorded - listed) or sorted(listed - recorded)
        raise FormatError(f"{where} lists {len(listed)} shard(s), the record {len(recorded)} "
                          f"(first difference: {diff[0]}); rerun `reco embed-memory`")
    if str(manifest.info.get("model_id", record.model_id)) != record.model_id:
        raise FormatError(f"{where}: model {manifest.info.get('model_id')!r}, the record says "
                          f"{record.model_id!r}")
    wrong = sorted(k for k, v in manifest.counts.items()
                   if k in record.counts and record.counts[k] != v)
    if wrong:
        raise FormatError(f"{where}: counts {', '.join(f'{k}={manifest.counts[k]}' for k in wrong)}, "
                          f"the record says {', '.join(f'{k}={record.counts[k]}' for k in wrong)}; "
                          f"rerun `reco embed-memory`")
    record.verify(folder, command="embed-memory")
    for name in manifest.shards:
        rows = record.outputs[name].get("rows")
        if rows is not None and manifest.counts.get(name, rows) != rows:
            raise FormatError(f"{where}: {name} has {manifest.counts[name]} rows, the record {rows}")
    return record.digest()


def _check_manifest_totals(folder: str, manifest: formats.Manifest) -> None:
    """Without a record: the shard count and rows a manifest claims match the footers."""
    where = f"{folder}/manifest.json"
    expected = manifest.info.get("shards_expected")
    if isinstance(expected, int) and expected != len(manifest.shards):
        raise FormatError(f"{where}: lists {len(manifest.shards)} shard(s), expected {expected}; "
                          f"rerun `reco embed-memory`")
    rows = manifest.info.get("rows")
    if isinstance(rows, int) and not isinstance(rows, bool):
        found = sum(pq.read_metadata(p).num_rows for p in manifest.shard_paths(folder))
        if found != rows:
            raise FormatError(f"{where}: says {rows} rows, its shards hold {found}")


def shard_schema(path: str) -> pa.Schema:
    """The schema (with its ``reco.*`` metadata) from one shard's footer; a missing or corrupt
    file is a FormatError naming it."""
    try:
        fs, fs_path = fsspec.core.url_to_fs(str(path))
        with fs.open(fs_path, "rb") as f:
            return pq.read_schema(f)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc


def check_shard_schema(schema: pa.Schema, dim: int, path: str,
                       modalities: tuple[str, ...] = ("image", "text")) -> None:
    """FormatError naming ``path`` unless it is an ``embedded/2`` shard (its own ``reco.dim`` and
    column widths agreeing) with ``id``/``status`` and the embeddings at ``dim``."""
    formats.embedded_dim(schema, path)
    expected = formats.block_type(dim)
    for m in modalities:
        name = f"{m}_emb"
        got = schema.field(name).type if name in schema.names else None
        if got is not None and not got.equals(expected):
            found = (f" (dimension {got.byte_width / 2:g})" if pa.types.is_fixed_size_binary(got) else "")
            raise FormatError(f"{path}: column {name!r} has type {got}{found}, expected {expected} "
                              f"(dimension {dim} from the manifest)")
    formats.check_columns(schema, pa.schema([pa.field("id", pa.int64()), pa.field("status", pa.string())]
                                             + [pa.field(f"{m}_emb", expected) for m in modalities]), path)


def _split_dim(recorded, schema: pa.Schema, folder: str, first: str) -> int:
    """The split's dimension: manifest info, else the first shard's (metadata/column width)."""
    if recorded not in (None, 0, ""):                  # absent: as before, fall back to the shard
        if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
            raise FormatError(f"{folder}/manifest.json: info.dim is {recorded!r}, "
                              f"expected a positive integer")
        return recorded
    dim = formats.embedded_dim(schema, first)
    if dim < 1:
        raise FormatError(f"{first}: no embedding dimension (not an embedded shard?)")
    return dim


def model_id_of(schema: pa.Schema, path: str) -> str:
    """``model|pretrained`` from a shard's ``reco.model`` / ``reco.pretrained`` metadata ("" when
    it names no model); bytes that are not UTF-8 are a FormatError naming ``path``."""
    model = formats.meta_text(schema, "model", path) or ""
    pretrained = formats.meta_text(schema, "pretrained", path) or ""
    return f"{model}|{pretrained}" if model else ""


def success_count(path: str) -> int:
    """Number of success rows of one shard (reads only the status column)."""
    status = formats.read_parquet(path, columns=["status"]).column("status")
    return int(pc.sum(pc.equal(status, formats.STATUS_OK)).as_py() or 0)


def read_table(path: str | Path, dim: int | None = None, columns: list[str] | None = None
               ) -> pa.Table:
    """One embedded shard as a table, validated: format ``embedded/2`` (``embedded/1``: rerun
    embed-memory --force) and schema from its footer (its dimension, from its metadata and column
    widths, must be ``dim`` when given: MismatchError), ids non-null and unique, statuses known,
    the success rows' embeddings non-null, finite and not all-zero. ``columns``: read (and
    require) only these, each validated as above; default all the declared columns."""
    path = str(path)
    schema = shard_schema(path)
    found = formats.embedded_dim(schema, path)
    if found < 1:
        raise FormatError(f"{path}: no embedding dimension (not an embedded shard?)")
    if dim is not None:
        check_dim(found, dim, path)
    declared = formats.embedded_schema(found)
    if columns is not None:                             # only these are required (and read)
        declared = pa.schema([declared.field(c) for c in columns if c in declared.names])
    formats.check_columns(schema, declared, path)
    table = formats.read_parquet(path, columns=columns)
    rows = _success_rows(table, path) if "status" in table.column_names else None
    ids = None
    if "id" in table.column_names:
        check_ids(table.column("id"), path)
        ids = table.column("id").to_numpy()[rows] if rows is not None else None
    for name in formats.VECTOR_COLUMNS:
        if name in table.column_names and rows is not None:
            _success_vectors(table.column(name), rows, found, path, name, ids=ids)
    return table


def read_shard(path: str, dim: int, start: int = 0, stop: int | None = None,
               modalities: tuple[str, ...] = ("image", "text")) -> dict[str, np.ndarray]:
    """Success rows ``[start:stop]`` of one shard: {"id": (n,), "image": (n, dim), "text": ...}
    float32, validated (readable, format, column types, dimension, nulls, NaN/inf, all-zero);
    every problem is a FormatError naming ``path``."""
    cols = ["id", "status"] + [f"{m}_emb" for m in modalities]
    check_shard_schema(shard_schema(path), dim, path, modalities)       # footer only
    table = formats.read_parquet(path, columns=cols)
    if table.column("id").null_count:
        raise FormatError(f"{path}: column 'id' has {table.column('id').null_count} null(s)")
    rows = _success_rows(table, path)[start:stop]
    out = {"id": table.column("id").to_numpy()[rows].astype(np.int64)}
    for m in modalities:
        out[m] = _success_vectors(table.column(f"{m}_emb"), rows, dim, path, f"{m}_emb",
                                  ids=out["id"])
    return out


def _success_rows(table: pa.Table, path: str) -> np.ndarray:
    """Row numbers of the success rows; a null or unknown status is a FormatError."""
    status = table.column("status")
    if status.null_count:
        raise FormatError(f"{path}: column 'status' has {status.null_count} null(s)")
    known = pc.is_in(status, value_set=pa.array(formats.STATUSES)).to_numpy(zero_copy_only=False)
    if not known.all():
        row = int(np.argmin(known))
        raise FormatError(f"{path}: row {row}: unknown status {status[row].as_py()!r}")
    return np.flatnonzero(pc.equal(status, formats.STATUS_OK).to_numpy(zero_copy_only=False))


def _success_vectors(col: pa.ChunkedArray, rows: np.ndarray, dim: int, path: str, name: str,
                     ids: np.ndarray | None = None) -> np.ndarray:
    """The vectors of ``rows`` (success rows) of an embedding column as float32, or a
    FormatError naming ``path`` and the row: null, NaN/inf, all-zero."""
    modality = name.removesuffix("_emb")
    ids = ids if ids is not None else rows

    def first(mask: np.ndarray) -> str:
        i = int(np.argmax(mask))
        return f"row {int(rows[i])} (id {int(ids[i])})"

    if col.null_count:                                  # allowed in rows that are not success
        nulls = col.is_null().to_numpy(zero_copy_only=False)[rows]
        if nulls.any():
            raise FormatError(f"{path}: row {int(rows[np.argmax(nulls)])} has status success "
                              f"but a null {name}")
        col, take = col.take(pa.array(rows, pa.int64())), slice(None)
    else:
        take = rows
    half = formats.decode_vectors(col, dim, np.float16, f"{path}: column '{name}'")[take]
    vectors = formats.to_float32(half)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise FormatError(f"{path}: {int(bad.sum())} {modality} embedding(s) contain NaN/inf, "
                          f"first at {first(bad)}")
    zero = ~half.any(axis=1)
    if zero.any():
        raise FormatError(f"{path}: {int(zero.sum())} all-zero {modality} embedding(s) on success "
                          f"rows, first at {first(zero)}; rerun `reco embed-memory --force`")
    return vectors


def read_split(split: EmbeddedFolder, modalities: tuple[str, ...] = ("image", "text")) -> dict[str, np.ndarray]:
    """All success rows of a split, concatenated in manifest order."""
    parts = [read_shard(p, split.dim, modalities=modalities) for p in split.shards]
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    check_unique(out["id"], [len(p["id"]) for p in parts], split)
    return out


def check_unique(ids: np.ndarray, sizes: list[int], split: EmbeddedFolder) -> None:
    """FormatError naming the shard(s) holding the first duplicated id."""
    values, counts = np.unique(ids, return_counts=True)
    if len(values) == len(ids):
        return
    dup = int(values[np.argmax(counts > 1)])
    where = ids == dup
    shards = np.repeat(np.arange(len(sizes)), sizes)[where]
    names = ", ".join(split.shards[i] for i in sorted(set(shards.tolist())))
    raise FormatError(f"{names}: id {dup} appears {int(where.sum())} times among the success rows "
                      f"of {split.folder} (duplicate ids)")
