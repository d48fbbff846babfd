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

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.pipelines.config import EmbedConfig

REFUSED = "refused"
SCHEMES = ("http", "https")


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
        convert = pa_csv.ConvertOptions(include_columns=columns,
                                        column_types={c: pa.string() for c in columns[:2]})
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
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files: set[str] = set()
    for item in map(str, inputs):
        fs, path = fsspec.core.url_to_fs(item)
        if fs.isdir(path):
            found = [p for p in fs.find(path) if _has_format(p)]
        else:
            found = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        if not found:
            raise FormatError(f"{item}: no URL list found")
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


def inspect_url_files(files: list[str], cfg: EmbedConfig) -> list[UrlFile]:
    """Check every file has the configured columns and count its rows (global ids follow)."""
    out, offset = [], 0
    for path in files:
        fmt = url_format(path)
        names_fn, read_fn = FORMATS[fmt]
        try:
            names = names_fn(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise FormatError(f"{path}: cannot read URL list ({exc})") from exc
        missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in names]
        if missing:
            raise FormatError(f"{path}: missing column(s) {missing} (has {names}); set "
                              f"embed.url_col / embed.caption_col to the right names")
        columns = [cfg.url_col, cfg.caption_col]
        if cfg.label_col and cfg.label_col in names:
            columns.append(cfg.label_col)
        rows = _count_rows(path, fmt, columns)
        out.append(UrlFile(path, fmt, tuple(columns), offset, rows))
        offset += rows
    return out


def _count_rows(path: str, fmt: str, columns: list[str]) -> int:
    if fmt == "parquet":
        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return FORMATS[fmt][1](path, columns[:1]).num_rows


def num_shards(files: list[UrlFile], shard_size: int) -> int:
    total = sum(f.rows for f in files)
    return -(-total // shard_size)


# ---------------------------------------------------------------------------------------------
# reading into shards (worker side)
# ---------------------------------------------------------------------------------------------

def read_rows(url_file: UrlFile) -> Iterator[dict]:
    """Rows of one file as dicts with global ids."""
    table = FORMATS[url_file.format][1](url_file.path, list(url_file.columns))
    if table.num_rows != url_file.rows:
        raise FormatError(f"{url_file.path}: has {table.num_rows} rows, {url_file.rows} when inspected")
    cols = [table.column(c).to_pylist() for c in url_file.columns]
    labels = cols[2] if len(cols) > 2 else [None] * table.num_rows
    for i, (url, caption, label) in enumerate(zip(cols[0], cols[1], labels)):
        yield {"id": url_file.offset + i, "url": url, "caption": caption,
               "label": None if label is None else _label(label, url_file.path, i),
               "status": None, "error_message": None}


def _label(value, path: str, row: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{path}: row {row}: label {value!r} is not an integer") from exc


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

def _private(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
            or addr.is_multicast or addr.is_unspecified)


def _resolve(host: str) -> list[str]:
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})


def refusal(url, allow_private: bool, resolve: Callable[[str], list[str]] = _resolve) -> str | None:
    """Why ``url`` must not be fetched, or None. Hosts resolving to any private, loopback or
    link-local address (cloud metadata 169.254.169.254 included) are refused unless allowed."""
    if not isinstance(url, str) or not url.strip():
        return "empty url"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:
        return f"malformed url ({exc})"
    if parts.scheme.lower() not in SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} not allowed (only http, https)"
    if not host:
        return "url has no host"
    if allow_private:
        return None
    try:
        addresses = resolve(host)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve host {host!r} ({exc})"
    bad = [a for a in addresses if _private(a)]
    if bad or not addresses:
        return f"host {host!r} resolves to a private/loopback/link-local address {bad[:1]}"
    return None


class _MarkRefused(beam.DoFn):
    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
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
            reason = None if row["status"] else refusal(row["url"], self.allow_private, resolve)
            if reason:
                row = {**row, "status": REFUSED, "error_message": reason}
                self.refused.inc()
            out.append(row)
        yield shard, out


class FilterUnsafeUrls(beam.PTransform):
    """Shards -> same shards with unsafe rows marked ``refused`` (they are never fetched)."""

    def __init__(self, allow_private: bool = False):
        super().__init__()
        self.allow_private = allow_private

    def expand(self, shards):
        return shards | "MarkRefused" >> beam.ParDo(_MarkRefused(self.allow_private))
