"""Write embedded shards (one atomic Parquet file per shard) and the folder's manifest.

``part-{shard:05d}.parquet`` follows :func:`reco.formats.embedded_schema`; a file either does not
exist or is complete (atomic rename), which is what resume relies on. The manifest is written at
the end from what is on disk, so it lists exactly the complete shards.
"""
from __future__ import annotations

import logging
import re
from collections import Counter

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.console import advance
from reco.errors import MismatchError
from reco.formats import (EMBEDDED_FORMAT, STATUSES, Manifest, atomic_write_table,
                          check_embedded_format, embedded_schema, encode_vectors)
from reco.record import FILE as RECORD_FILE
from reco.record import Record, StaleError, outputs_of

log = logging.getLogger(__name__)
PART = re.compile(r"part-(\d{5,})\.parquet$")


def shard_path(output_dir: str, shard: int) -> str:
    return f"{str(output_dir).rstrip('/')}/part-{shard:05d}.parquet"


def complete_shards(output_dir: str) -> dict[int, str]:
    """shard index -> path of every complete shard file in ``output_dir`` (none if missing)."""
    fs, path = fsspec.core.url_to_fs(str(output_dir))
    if not fs.isdir(path):
        return {}
    found = {}
    for name in fs.ls(path, detail=False):
        m = PART.search(name.rsplit("/", 1)[-1])
        if m and not name.rsplit("/", 1)[-1].startswith("."):
            found[int(m.group(1))] = shard_path(output_dir, int(m.group(1)))
    return dict(sorted(found.items()))


def rows_to_table(rows: list[dict], dim: int, model: str = "", pretrained: str = "",
                  extra: tuple[str, ...] = ()) -> pa.Table:
    """Rows (with float32 ``image_emb``/``text_emb`` on success) -> a table of embedded_schema.
    Rows without embeddings get all-zero vectors: filter on ``status == "success"``. ``extra``:
    string columns appended after the schema's (foreign inputs carry their sample ``key``)."""
    schema = embedded_schema(dim, model, pretrained)
    for name in extra:
        schema = schema.append(pa.field(name, pa.string()))
    columns = {name: pa.array([r.get(name) for r in rows], type=schema.field(name).type)
               for name in ("id", "url", "caption", "label", "status", "error_message")}
    for name in ("image_emb", "text_emb"):
        columns[name] = _embedding_column([r.get(name) for r in rows], dim)
    columns.update({name: pa.array([r.get(name) for r in rows], pa.string()) for name in extra})
    return pa.Table.from_pydict(columns, schema=schema)


def _embedding_column(vectors: list, dim: int) -> pa.Array:
    """Zero vectors where there is no embedding (status != success), not nulls: the convention of
    ``embedded_schema`` (a whole column decodes without a validity mask)."""
    dense = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            dense[i] = v
    return encode_vectors(dense, dim)


def write_shard(output_dir: str, shard: int, rows: list[dict], dim: int, model: str = "",
                pretrained: str = "", extra: tuple[str, ...] = ()) -> dict[str, int]:
    """Write one shard atomically; returns counts by status."""
    atomic_write_table(rows_to_table(rows, dim, model, pretrained, extra), shard_path(output_dir, shard))
    return dict(Counter(r["status"] for r in rows))


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir: str, dim: int, model: str, pretrained: str, extra=(),
                 shards: int | None = None):
        self.args = (str(output_dir), dim, model, pretrained, tuple(extra))
        self.of = f" of {shards}" if shards else ""
        self.written = beam.metrics.Metrics.counter("reco.embed", "shards_written")
        self.rows = beam.metrics.Metrics.counter("reco.embed", "rows_written")

    def process(self, element):
        shard, rows = element
        counts = write_shard(self.args[0], shard, rows, *self.args[1:])
        self.written.inc()
        self.rows.inc(len(rows))
        if not advance(self.args[0], len(rows), shard=shard):   # no driver bar in this process
            log.info("shard %05d%s: wrote %d rows %s", shard, self.of, len(rows), counts)
        yield shard, counts


class WriteShards(beam.PTransform):
    """(shard, embedded rows) -> (shard, counts by status), one Parquet file per shard."""

    def __init__(self, output_dir: str, dim: int, model: str = "", pretrained: str = "",
                 extra: tuple[str, ...] = (), shards: int | None = None):
        super().__init__()
        self.fn = _WriteShardFn(output_dir, dim, model, pretrained or "", extra, shards)

    def expand(self, shards):
        return shards | "AtomicParquet" >> beam.ParDo(self.fn)


def check_model(output_dir: str, model_id: str) -> None:
    """Refuse to resume into a folder whose shards are of another format (``embedded/1``:
    FormatError saying to rerun with --force) or were embedded with another model."""
    from reco.embedded import model_id_of, shard_schema

    for path in list(complete_shards(output_dir).values())[:1]:
        schema = shard_schema(path)
        check_embedded_format(schema, path)
        got = model_id_of(schema, path) or "|"
        if got != model_id:
            raise MismatchError(f"{path}: embedded with model {got}, not {model_id}; use another "
                                f"output folder or rerun `reco embed-memory --force`")


LEGACY_JOB_FILE = "job.json"           # what versions before the run record wrote


def clear_output(output_dir: str) -> list[str]:
    """``--force``: delete the manifest, the record, every complete shard and a legacy
    ``job.json`` of ``output_dir`` (manifest and record first: none may list a deleted shard);
    returns the shard paths deleted."""
    from reco.record import FILE as RECORD_FILE

    fs, root = fsspec.core.url_to_fs(str(output_dir))
    shards = list(complete_shards(output_dir).values())
    root = root.rstrip('/')
    for target in [f"{root}/{Manifest.FILE}", f"{root}/{RECORD_FILE}",
                   *(fsspec.core.url_to_fs(p)[1] for p in shards), f"{root}/{LEGACY_JOB_FILE}"]:
        if fs.exists(target):
            fs.rm(target)
    return shards


def shard_rows(output_dir: str) -> dict[str, int]:
    """Rows of every complete shard (from its footer), by file name."""
    out = {}
    for path in complete_shards(output_dir).values():
        with fsspec.open(path, "rb") as f:
            out[path.rsplit("/", 1)[-1]] = pq.read_metadata(f).num_rows
    return out


def write_manifest(output_dir: str, model_id: str, dim: int, info: dict | None = None) -> Manifest:
    """Manifest of the complete shards on disk: their names, counts by status, model, dim."""
    from reco.embedded import read_table

    counts = Counter({s: 0 for s in STATUSES})
    shards = complete_shards(output_dir)
    rows = 0
    for path in shards.values():
        status = read_table(path, columns=["status"]).column("status").to_pylist()
        counts.update(status)
        rows += len(status)
    manifest = Manifest(kind="embedded", shards=[p.rsplit("/", 1)[-1] for p in shards.values()],
                        counts=dict(counts), info={**(info or {}), "model_id": model_id, "dim": dim,
                                                   "rows": rows, "format": EMBEDDED_FORMAT})
    manifest.write(output_dir)
    return manifest


# ---------------------------------------------------------------------------------------------
# the run record of an embedded folder (reco.record): embed-memory and import-embeddings
# ---------------------------------------------------------------------------------------------

def check_record(output_dir: str, planned: Record, command: str = "embed-memory") -> None:
    """Compare the plan with the output's record (StaleError on any difference; recorded shards
    on disk must still have their digests); record the plan when there is none. Shards without
    a record (an older reco, another tool) are refused: their options are unknown."""
    if "://" in output_dir:
        return
    record = Record.read(output_dir, "embed")
    if record is None:
        if complete_shards(output_dir):
            raise StaleError(f"{output_dir}: shards without a {RECORD_FILE} (written by an older "
                             f"reco or another tool): their inputs and options are unknown; rerun "
                             f"`reco {command} --force` to redo them")
        planned.write(output_dir)
        return
    record.check_same(output_dir, options=planned.options, inputs=planned.inputs,
                      model_id=planned.model_id, command=command)
    on_disk = {p.rsplit("/", 1)[-1] for p in complete_shards(output_dir).values()}
    record.verify(output_dir, sorted(on_disk & set(record.outputs)), command=command)


def finish_record(output_dir: str, manifest: Manifest, shards_expected: int) -> Record | None:
    """The output's record with every complete shard's digest and rows (after the manifest)."""
    if "://" in output_dir:
        return None
    record = Record.read(output_dir, "embed")
    rows = shard_rows(output_dir)
    record.outputs = outputs_of(output_dir, manifest.shards, rows)
    record.counts = {**manifest.counts, "rows": sum(rows.values()), "shards_expected": shards_expected}
    record.complete = len(manifest.shards) == shards_expected
    record.write(output_dir)
    return record
