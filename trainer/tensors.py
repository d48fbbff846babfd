"""The one reader of trainer tensors (``neighbours/tensors``, :func:`reco.formats.tensors_schema`,
format ``tensors/2``), used by the trainer's stream (:mod:`reco.trainer.data`), the ablations and
the property tests.

Bad input is one :class:`~reco.errors.FormatError` naming the shard: :func:`read_tensors_info`
reads every shard's footer once (readable Parquet, format version, columns, ``reco.*`` metadata,
row groups) before training starts (shards of the older format ``tensors/1`` are refused, with
the advice to rerun ``reco precompute-neighbours --force``); each row group read is checked for
decoding errors, nulls, NaN/inf values and the footer's row count (a bit-level NaN/inf test on
the decoded float16 view).

* :func:`read_tensors_info`: a tensors folder (manifest, run record, every footer; no data);
* :func:`read_row_group`: one row group of an opened shard, validated (what the stream reads);
* :func:`read_tensors_shard`: one whole shard, validated (footer, every row group, unique ids).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.formats import (Manifest, check_columns, check_tensors_format, decode_block, meta_int,
                          meta_text, parse_field, tensors_schema)
from reco.validate import READ_ERRORS, check_dim


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
        value = (meta_text(first, "fields", first_path) or "").split(",")
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
    dim = _positive(manifest.info.get("dim"), "dim", where) or meta_int(first, "dim", paths[0]) or 0
    k = _positive(manifest.info.get("k"), "k", where) or meta_int(first, "k", paths[0]) or 0
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
            got = meta_int(schema, key, path)
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


def read_row_group(info: TensorsInfo, files: dict, shard: int, group: int,
                   fields: tuple[str, ...], k: int | None = None) -> dict[str, np.ndarray]:
    """Row group ``group`` of shard ``shard`` of ``info`` as float16 arrays (views of the Arrow
    buffers, read-only), each field's block cut to its first ``k`` neighbours (default: all);
    ``files`` caches the open ParquetFiles. Any read/decoding problem, a null, a NaN/inf value
    or a row count other than the footer's is a FormatError naming the shard."""
    path, d, stored = info.shards[shard], info.dim, info.k
    k = k or stored
    try:
        if shard not in files:
            files[shard] = pq.ParquetFile(path)
        table = files[shard].read_row_group(group, columns=["id", "v", "t", *fields])
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: cannot read row group {group} "
                          f"({type(exc).__name__}: {exc})") from exc
    groups = info.row_groups[shard]
    where = f"{path}: row group {group}" if len(groups) > 1 else path   # named when several
    expected = groups[group]
    if table.num_rows != expected:
        raise FormatError(f"{where} has {table.num_rows} rows, its footer said {expected} "
                          f"(file changed since it was opened?)")
    for name in table.column_names:
        if table.column(name).null_count:
            raise FormatError(f"{where}: column {name!r} has {table.column(name).null_count} null(s)")
    out = {"id": table.column("id").to_numpy()}
    for name in ("v", "t"):
        out[name] = decode_block(table.column(name), d, 1, f"{where}: column {name!r}")[:, 0]
    for name in fields:
        block = decode_block(table.column(name), d, stored, f"{where}: column {name!r}")
        out[name] = block if k == stored else np.ascontiguousarray(block[:, :k])
    for name in ("v", "t", *fields):
        _check_finite_fp16(out[name], out["id"], name, where)
    return out


def read_tensors_shard(path: str | os.PathLike, dim: int | None = None,
                       k: int | None = None) -> pa.Table:
    """One tensors shard, validated as the trainer reads it: its footer (format version, ``reco.*``
    metadata, columns; ``dim`` / ``k`` when given must match: MismatchError), then every row
    group (:func:`read_row_group`), then its ids (unique). Returns the whole table."""
    path = str(path)
    meta, schema = _read_footer(path)
    check_tensors_format(schema, path)
    found_dim, found_k = meta_int(schema, "dim", path), meta_int(schema, "k", path)
    if not found_dim or not found_k or found_dim < 1 or found_k < 1:
        raise FormatError(f"{path}: no reco.dim/reco.k metadata (not a tensors shard?)")
    for want, got, what in ((dim, found_dim, "embedding dimension"), (k, found_k, "k")):
        if want is not None:
            check_dim(got, want, path, what=what)
    fields = _manifest_fields(None, schema, path, path)
    check_columns(schema, tensors_schema(found_dim, found_k, fields), path)
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    info = TensorsInfo(path, [path], [groups], found_dim, found_k, fields)
    files: dict = {}
    for group in range(len(groups)):
        read_row_group(info, files, 0, group, fields)
    _check_ids([path], path)
    try:
        return pq.read_table(path)
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
