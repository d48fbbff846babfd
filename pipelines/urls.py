"""URL lists -> shards of rows: reading (Parquet/CSV/TSV, local or fsspec), ids, safety filter.

The driver inspects the files first (:func:`inspect_url_files`: columns checked, rows counted) so a
bad list fails with one :class:`~reco.errors.FormatError` before any work. Inside the pipeline,
:class:`ReadUrlShards` reads each file once and groups its rows into shards of ``shard_size`` by
global row number (the row's ``id``); :class:`FilterUnsafeUrls` marks rows that must not be
fetched (non-http(s) schemes, private/loopback/link-local hosts) as ``refused`` with a reason.

A row is a dict ``{id, url, caption, label, status, error_message}``; a shard element is
``(shard_index, [row, ...])`` with rows sorted by id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.pipelines import safe_http
from reco.pipelines.config import EmbedConfig
from reco.pipelines.safe_http import NetPolicy, Refused, check_url

REFUSED = "refused"
SCHEMES = safe_http.SCHEMES


# ---------------------------------------------------------------------------------------------
# file formats (registry: suffix -> schema reader, table reader)
# ---------------------------------------------------------------------------------------------

def _open(path: str):
    return fsspec.open(path, "rb", compression="infer")


def _csv_reader(delimiter: str):
    def names(path: str) -> list[str]:
        with _open(path) as f:
            return pa_csv.open_csv(f, parse_options=pa_csv.ParseOptions(delimiter=delimiter)).schema.names

    def read(path: str, columns: list[str]) -> pa.Table:
        # url/caption as bytes: a list with invalid UTF-8 is decoded row by row (U+FFFD)
        convert = pa_csv.ConvertOptions(include_columns=columns,
                                        column_types={c: pa.binary() for c in columns[:2]})
        with _open(path) as f:
            return pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                                   convert_options=convert)
    return names, read


def _parquet_names(path: str) -> list[str]:
    with _open(path) as f:
        return pq.read_schema(f).names


def _parquet_read(path: str, columns: list[str]) -> pa.Table:
    with _open(path) as f:
        return pq.read_table(f, columns=columns)


FORMATS: dict[str, tuple[Callable, Callable]] = {
    "parquet": (_parquet_names, _parquet_read),
    "csv": _csv_reader(","),
    "tsv": _csv_reader("\t"),
}


def url_format(path: str) -> str:
    """'a/b.csv.gz' -> 'csv'; FormatError for a suffix no reader is registered for."""
    parts = path.rsplit("/", 1)[-1].lower().split(".")
    parts = parts[:-1] if parts[-1] in ("gz", "bz2", "zst") else parts
    if len(parts) < 2 or parts[-1] not in FORMATS:
        raise FormatError(f"{path}: unknown URL list format; expected one of "
                          f"{', '.join('.' + s for s in FORMATS)}")
    return parts[-1]


def list_url_files(inputs: str | Iterable[str]) -> list[str]:
    """Paths, folders or globs (local or fsspec URLs) -> the URL list files, sorted."""
    return expand_paths(inputs, _has_format, "no URL list found", filter_globs=False)


def expand_paths(inputs: str | Iterable[str], keep: Callable[[str], object], missing: str, *,
                 filter_globs: bool = True) -> list[str]:
    """Paths, folders (searched recursively for files that ``keep`` accepts) or globs, local or
    fsspec URLs -> the files, sorted, remote ones with their protocol; an item that finds
    nothing is a FormatError "ITEM: ``missing``"."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files: set[str] = set()
    for item in map(str, inputs):
        fs, path = fsspec.core.url_to_fs(item)
        if fs.isdir(path):
            found = [p for p in fs.find(path) if keep(p)]
        elif any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if keep(p) or not filter_globs]
        else:
            found = [path] if fs.exists(path) else []
        if not found:
            raise FormatError(f"{item}: {missing}")
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        files.update(p if local else fs.unstrip_protocol(p) for p in found)
    return sorted(files)


def _has_format(path: str) -> bool:
    try:
        url_format(path)
        return True
    except FormatError:
        return False


# ---------------------------------------------------------------------------------------------
# inspection (driver side, before any work)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UrlFile:
    path: str
    format: str
    columns: tuple[str, ...]     # columns read, in the order url, caption[, label]
    offset: int                  # id of the file's first row
    rows: int


TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
              pa.types.is_large_binary, pa.types.is_null)
LABEL_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_null)
READ_ERRORS = (OSError, EOFError, ValueError, pa.ArrowException)


def inspect_url_files(files: list[str], cfg: EmbedConfig) -> list[UrlFile]:
    """Check every file has the configured columns of usable types (CSV/TSV: every row parsed,
    labels integers) and count its rows (global ids follow). One FormatError naming the file,
    column and row otherwise, before any work."""
    out, offset = [], 0
    for path in files:
        fmt = url_format(path)
        names_fn, read_fn = FORMATS[fmt]
        try:
            names = names_fn(path)
        except READ_ERRORS as exc:
            raise FormatError(f"{path}: cannot read URL list ({exc})") from exc
        missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in names]
        if missing:
            raise FormatError(f"{path}: missing column(s) {missing} (has {names}); set "
                              f"embed.url_col / embed.caption_col to the right names")
        columns = [cfg.url_col, cfg.caption_col]
        if cfg.label_col and cfg.label_col in names:
            columns.append(cfg.label_col)
        rows = _check_rows(path, fmt, columns)
        out.append(UrlFile(path, fmt, tuple(columns), offset, rows))
        offset += rows
    return out


def _check_rows(path: str, fmt: str, columns: list[str]) -> int:
    """Row count; column types (Parquet: from the schema; CSV/TSV: the whole file is parsed)."""
    if fmt == "parquet":
        try:
            with _open(path) as f:
                meta = pq.ParquetFile(f)
                schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except READ_ERRORS as exc:
            raise FormatError(f"{path}: not a readable Parquet file ({exc})") from exc
        _check_types(path, schema, columns)
        if len(columns) > 2 and schema.field(columns[2]).type == pa.uint64():    # may overflow int64
            _labels(_read(path, fmt, columns[2:]).column(0), path)
        return rows
    table = _read(path, fmt, columns)
    _check_types(path, table.schema, columns)
    if len(columns) > 2:
        _labels(table.column(columns[2]), path)
    return table.num_rows


def _check_types(path: str, schema: pa.Schema, columns: list[str]) -> None:
    for i, name in enumerate(columns):
        kinds = TEXT_TYPES if i < 2 else LABEL_TYPES
        typ = schema.field(name).type
        if not any(k(typ) for k in kinds):
            want = "text" if i < 2 else "integer"
            raise FormatError(f"{path}: column {name!r} has type {typ}, expected {want}")


def _read(path: str, fmt: str, columns: list[str]) -> pa.Table:
    try:
        return FORMATS[fmt][1](path, columns)
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: cannot read URL list ({exc})") from exc


def num_shards(files: list[UrlFile], shard_size: int) -> int:
    total = sum(f.rows for f in files)
    return -(-total // shard_size)


# ---------------------------------------------------------------------------------------------
# reading into shards (worker side)
# ---------------------------------------------------------------------------------------------

def read_rows(url_file: UrlFile) -> Iterator[dict]:
    """Rows of one file as dicts with global ids. Text that is not valid UTF-8 is decoded with
    U+FFFD replacement characters (the row is kept); a null caption stays None (embedded as "")."""
    table = _read(url_file.path, url_file.format, list(url_file.columns))
    if table.num_rows != url_file.rows:
        raise FormatError(f"{url_file.path}: has {table.num_rows} rows, {url_file.rows} when inspected")
    urls, captions = (_texts(table.column(c)) for c in url_file.columns[:2])
    labels = (_labels(table.column(url_file.columns[2]), url_file.path) if len(url_file.columns) > 2
              else [None] * table.num_rows)
    for i, (url, caption, label) in enumerate(zip(urls, captions, labels)):
        yield {"id": url_file.offset + i, "url": url, "caption": caption, "label": label,
               "status": None, "error_message": None}


def _texts(column: pa.ChunkedArray) -> list[str | None]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())       # no UTF-8 validation; decoded below
    return [None if v is None else v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for v in column.to_pylist()]


def _labels(column: pa.ChunkedArray, path: str) -> list[int | None]:
    return [None if v is None else _label(v, path, i) for i, v in enumerate(column.to_pylist())]


INT64 = (-2 ** 63, 2 ** 63 - 1)         # the embedded format's label column (int64)


def _label(value, path: str, row: int) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        label = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FormatError(f"{path}: row {row}: label {value!r} is not an integer") from exc
    if not INT64[0] <= label <= INT64[1]:
        raise FormatError(f"{path}: row {row}: label {label} does not fit a 64-bit signed integer")
    return label


class _ShardPieces(beam.DoFn):
    """One URL file -> (shard, [rows]) pieces (a shard may span files), skipping done shards."""

    def __init__(self, shard_size: int, skip: frozenset[int]):
        self.shard_size = shard_size
        self.skip = skip

    def process(self, url_file: UrlFile):
        pieces: dict[int, list[dict]] = {}
        for row in read_rows(url_file):
            shard = row["id"] // self.shard_size
            if shard not in self.skip:
                pieces.setdefault(shard, []).append(row)
        yield from pieces.items()


def _merge(shard_rows: tuple[int, Iterable[list[dict]]]) -> tuple[int, list[dict]]:
    shard, pieces = shard_rows
    return shard, sorted((r for piece in pieces for r in piece), key=lambda r: r["id"])


class ReadUrlShards(beam.PTransform):
    """PBegin -> (shard_index, rows) for every shard not in ``skip``."""

    def __init__(self, files: list[UrlFile], shard_size: int, skip: Iterable[int] = ()):
        super().__init__()
        self.files = list(files)
        self.shard_size = shard_size
        self.skip = frozenset(skip)

    def expand(self, pbegin):
        return (pbegin
                | "ListFiles" >> beam.Create(self.files)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadPieces" >> beam.ParDo(_ShardPieces(self.shard_size, self.skip))
                | "GroupShard" >> beam.GroupByKey()
                | "MergeShard" >> beam.Map(_merge))


# ---------------------------------------------------------------------------------------------
# URL safety
# ---------------------------------------------------------------------------------------------

def _resolve(host: str) -> list[str]:
    return safe_http.resolve(host)


def refusal(url, allow_networks: tuple[str, ...] = (),
            resolve: Callable[[str], list[str]] = _resolve) -> str | None:
    """Why ``url`` must not be fetched, or None. Hosts resolving to any address that is not
    globally reachable (private, loopback, link-local, cloud metadata 169.254.169.254...) are
    refused unless in ``allow_networks`` (link-local/metadata: always refused).
    This is the early, per-row check; the download step checks again when it connects (every
    redirect hop, the address actually connected to: :mod:`reco.pipelines.safe_http`)."""
    try:
        check_url(url, NetPolicy(allow_networks=tuple(allow_networks), resolver=resolve))
    except Refused as exc:
        return exc.args[0]
    return None


class _MarkRefused(beam.DoFn):
    def __init__(self, allow_networks: tuple[str, ...]):
        self.allow_networks = tuple(allow_networks)
        self.refused = beam.metrics.Metrics.counter("reco.embed", "refused")

    def process(self, element):
        shard, rows = element
        cache: dict[str, list[str] | Exception] = {}

        def resolve(host: str) -> list[str]:
            if host not in cache:
                try:
                    cache[host] = _resolve(host)
                except (OSError, UnicodeError) as exc:
                    cache[host] = exc
            if isinstance(cache[host], Exception):
                raise cache[host]
            return cache[host]

        out = []
        for row in rows:
            reason = None if row["status"] else refusal(row["url"], self.allow_networks, resolve)
            if reason:
                row = {**row, "status": REFUSED, "error_message": reason}
                self.refused.inc()
            out.append(row)
        yield shard, out


class FilterUnsafeUrls(beam.PTransform):
    """Shards -> same shards with unsafe rows marked ``refused`` (they are never fetched)."""

    def __init__(self, allow_networks: tuple[str, ...] = ()):
        super().__init__()
        self.allow_networks = tuple(allow_networks)

    def expand(self, shards):
        return shards | "MarkRefused" >> beam.ParDo(_MarkRefused(self.allow_networks))
