"""What ``embed-memory`` reads: a registry of input kinds, chosen by what the input is.

=================  ====================================================  ============================
kind               what it is                                            module (composite transform)
=================  ====================================================  ============================
``urls``           URL lists (Parquet/CSV/TSV: url, caption[, label]),   :mod:`.source_urls`
                   like LAION/CC12M metadata: downloaded, then embedded
``webdataset``     img2dataset's webdataset output: ``*.tar`` shards of  :mod:`.source_webdataset`
                   ``{key}.jpg|png|webp`` + ``{key}.txt`` + ``{key}.json``
                   (its ``{shard}.parquet`` / ``_stats.json`` sidecars
                   beside them are read, not taken for inputs)
``parquet-images`` img2dataset's parquet output: one row per sample with  :mod:`.source_parquet`
                   the image bytes (``jpg``/``png``/``webp`` column) and
                   ``caption`` or ``txt`` (``url``, ``key``... carried)
=================  ====================================================  ============================

:func:`resolve_inputs` lists the files (paths, folders, globs; local or fsspec), picks the kind
(``embed.input_format``: ``auto`` decides from the files: ``.tar`` -> webdataset, a Parquet file
with an image-bytes column -> parquet-images, other Parquet/CSV/TSV -> urls) and has the kind
inspect them on the driver, so bad input fails with one error naming the file before any work.
Foreign kinds (webdataset, parquet-images) never touch the network: one input file is one output
shard, streamed and embedded a batch at a time; ids are global row numbers in sorted file order.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable

import fsspec
import pyarrow.parquet as pq

from reco.errors import ConfigError, FormatError
from reco.pipelines.config import EmbedConfig

AUTO = "auto"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
URL_SUFFIXES = tuple(f".{s}{c}" for s in ("parquet", "csv", "tsv") for c in ("", ".gz", ".bz2", ".zst"))
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")     # img2dataset names it after encode_format


@dataclass(frozen=True)
class InputKind:
    name: str
    module: str          # under reco.pipelines: inspect(files, cfg), num_shards(files, size), Source
    summary: str

    def load(self):
        return importlib.import_module(f"reco.pipelines.{self.module}")


KINDS: dict[str, InputKind] = {k.name: k for k in (
    InputKind("urls", "source_urls", "URL lists (url, caption): downloaded with img2dataset"),
    InputKind("webdataset", "source_webdataset", "img2dataset webdataset shards (.tar)"),
    InputKind("parquet-images", "source_parquet", "img2dataset parquet output with image bytes"),
)}
FORMAT_CHOICES = (AUTO, *KINDS)


@dataclass(frozen=True)
class ShardFile:
    """One foreign input file = one output shard (webdataset tar, parquet with image bytes)."""

    path: str
    rows: int                    # rows it contributes (ids offset .. offset + rows - 1)
    offset: int
    shard: int
    sidecar: str | None = None   # webdataset: img2dataset's {shard}.parquet (every input row)
    columns: tuple[tuple[str, str], ...] = ()   # parquet-images: role -> column name


def image_column(names: Iterable[str], types: dict | None = None, wanted: str | None = None) -> str | None:
    """The column holding image bytes: ``wanted`` (embed.image_col) or the first of
    :data:`IMAGE_COLUMNS` present (binary when ``types`` is given)."""
    names = list(names)
    for name in ([wanted] if wanted else IMAGE_COLUMNS):
        if name in names and (types is None or "binary" in str(types[name])):
            return name
    return None


def _suffix_kind(path: str, listing: bool = True) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    if listing and name.startswith((".", "_")):   # in folders: hidden files, temporaries
        return None
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(URL_SUFFIXES):
        return "parquet" if ".parquet" in name else "urls"
    return None


def list_inputs(inputs: str | Iterable[str]) -> list[str]:
    """Paths, folders (searched recursively) or globs -> the input files, sorted. Parquet files
    with the stem of a tar beside them are img2dataset sidecars, not inputs."""
    from reco.pipelines.urls import expand_paths

    files = expand_paths(inputs, _suffix_kind, "no input found (URL lists .parquet/.csv/.tsv, "
                         "img2dataset webdataset shards .tar, or img2dataset parquet with image bytes)")
    tars = {stem(p) for p in files if _suffix_kind(p) == "webdataset"}
    return sorted(p for p in files if not (p.endswith(".parquet") and stem(p) in tars))


def stem(path: str) -> str:
    for suffix in (*TAR_SUFFIXES, ".parquet"):
        if path.lower().endswith(suffix):
            return path[:-len(suffix)]
    return path


def detect_kind(path: str, cfg: EmbedConfig) -> str:
    """The kind of one file: by suffix, and for Parquet by its columns (image bytes or not)."""
    kind = _suffix_kind(path, listing=False)
    if kind != "parquet":
        if kind is None:
            raise FormatError(f"{path}: unknown input; expected a URL list (.parquet/.csv/.tsv), "
                              f"a webdataset shard (.tar) or img2dataset parquet with image bytes")
        return kind
    try:
        with fsspec.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except (OSError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    types = {n: schema.field(n).type for n in schema.names}
    return "parquet-images" if image_column(schema.names, types, cfg.image_col) else "urls"


def resolve_inputs(inputs, cfg: EmbedConfig) -> tuple[str, list]:
    """(kind name, inspected files) for ``inputs``; ConfigError for an unknown
    ``embed.input_format`` or inputs of several kinds, FormatError naming a bad file."""
    wanted = cfg.input_format or AUTO
    if wanted not in FORMAT_CHOICES:
        raise ConfigError(f"--input-format {wanted!r}: choose one of {', '.join(FORMAT_CHOICES)}")
    files = list_inputs(inputs)
    if wanted == AUTO:
        kinds = {p: detect_kind(p, cfg) for p in files}
        found = sorted(set(kinds.values()))
        if len(found) > 1:
            examples = {k: next(p for p in files if kinds[p] == k) for k in found}
            raise ConfigError(f"inputs of several kinds ({examples}); give one kind per run "
                              f"(or --input-format)")
        wanted = found[0]
    return wanted, KINDS[wanted].load().inspect(files, cfg)


def num_shards(kind: str, files: list, shard_size: int) -> int:
    return KINDS[kind].load().num_shards(files, shard_size)


def source(kind: str, job):
    """The kind's composite transform: PBegin -> (shard, embedded rows) for the job's shards."""
    return KINDS[kind].load().Source(job)
