"""Input kind ``webdataset`` (:mod:`reco.pipelines.inputs`): img2dataset's webdataset output.

img2dataset writes per shard ``{shard}.tar`` holding the samples it downloaded,
``{key}.jpg|png|webp`` + ``{key}.txt`` (caption) + ``{key}.json`` (url, caption, status...), and
beside it ``{shard}.parquet`` (one row per input row, failed downloads included: key, url,
caption, status, error_message) and ``{shard}_stats.json``. One tar is one output shard:

* with the sidecar parquet, the shard holds one row per row of it, in its order: a failed
  download keeps img2dataset's status and message, a downloaded sample is embedded from the tar;
* without it, one row per sample of the tar, in tar order (the driver counts the samples).

Members are streamed (tarfile's stream mode grouped by webdataset's ``group_by_keys``, a batch
of images in memory at most). A sample without an image or without a caption member, or the samples a
truncated tar no longer holds, are rows with status ``failed_to_embed`` and a message naming
the tar and key; the job goes on. A tar the driver cannot read through is a FormatError.
"""
from __future__ import annotations

import json
import logging
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.formats import STATUS_OK, STATUSES
from reco.pipelines.foreign import FAILED, ForeignSource, num_shards, row  # noqa: F401
from reco.pipelines.inputs import IMAGE_COLUMNS, ShardFile, stem

log = logging.getLogger(__name__)
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
SIDECAR_COLUMNS = ("key", "url", "caption", "status", "error_message")


def sidecar_of(path: str) -> str | None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    side = stem(fs_path) + ".parquet"
    if not fs.exists(side):
        return None
    return side if path == fs_path else fs.unstrip_protocol(side)


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a tar, reading member headers only where the file seeks; a
    tar that ends before its end-of-archive blocks is a FormatError naming it."""
    keys, last = 0, None
    try:
        with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                key = _key(member.name) if member.isreg() else None
                if key is not None and key != last:
                    keys, last = keys + 1, key
            _check_end(path, tar)
    except TAR_ERRORS as exc:
        raise FormatError(f"{path}: not a readable tar ({type(exc).__name__}: {exc})") from exc
    return keys


def _check_end(path: str, tar: tarfile.TarFile) -> None:
    """tarfile stops quietly at a truncated header: a complete archive has its end-of-archive
    block (512 zero bytes) after the last member."""
    if path.lower().endswith(".tar"):           # compressed: offsets are not file positions
        fs, fs_path = fsspec.core.url_to_fs(path)
        size = fs.size(fs_path)
        if size is not None and size < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"truncated: it ends at byte {size}, inside the header or "
                                    f"data that starts at byte {tar.offset}")


def _key(name: str) -> str | None:
    from webdataset.tariterators import base_plus_ext

    base = name.rsplit("/", 1)[-1]
    if base.startswith(("__", ".")):
        return None
    return base_plus_ext(name)[0]


def inspect(files: list[str], cfg) -> list[ShardFile]:
    out, offset = [], 0
    for shard, path in enumerate(files):
        side = sidecar_of(path)
        if side:
            rows = read_sidecar(side, path, columns=[]).num_rows
        else:
            rows = count_samples(path)
        out.append(ShardFile(path, rows, offset, shard, side))
        offset += rows
    return out


def _members(path: str):
    """Regular members of a tar as webdataset file samples, streamed; truncation raises."""
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
            tar.members = []                    # stream mode: keep no member list
        _check_end(path, tar)


def _samples(path: str):
    """(key, {suffix: bytes}) of each sample of the tar (webdataset's ``group_by_keys``)."""
    from webdataset.tariterators import group_by_keys

    for sample in group_by_keys(_members(path)):
        yield sample["__key__"].rsplit("/", 1)[-1], sample


def _text(value) -> str | None:
    return None if value is None else value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _sample_row(id_: int, key: str, sample: dict, path: str, base: dict | None) -> dict:
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    url = (base or {}).get("url") or _text(meta.get("url"))
    image = next((sample[s] for s in IMAGE_COLUMNS if s in sample), None)
    caption = _text(sample.get("txt"))
    if image is None:
        return row(id_, url=url, caption=caption, key=key, status=FAILED,
                   error=f"{path}: sample {key!r} has no image member (.jpg/.png/.webp)")
    if caption is None:
        return row(id_, url=url, key=key, status=FAILED,
                   error=f"{path}: sample {key!r} has no caption member ({key}.txt)")
    return row(id_, url=url, caption=caption, key=key, image=image)


def read_sidecar(side: str, tar: str, columns: list[str] | None = None) -> pa.Table:
    """An img2dataset sidecar (``NNNNN.parquet`` beside the tar ``NNNNN.tar``): the one reader of
    this foreign format (embed-memory's webdataset input, REACT's downloads). ``columns``: those
    of :data:`SIDECAR_COLUMNS` it has (default all of them; ``[]``: none, rows only). Unreadable
    Parquet or no ``key`` column: a FormatError naming the sidecar and its tar."""
    try:
        with fsspec.open(side, "rb") as f:
            meta = pq.ParquetFile(f)
            names = meta.schema_arrow.names
            if "key" not in names:
                raise FormatError(f"{side}: img2dataset sidecar of {tar} has no 'key' column "
                                  f"(has {names}); delete it to read the tar alone")
            wanted = SIDECAR_COLUMNS if columns is None else columns
            table = meta.read(columns=[c for c in wanted if c in names])
    except (OSError, EOFError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{side}: img2dataset sidecar of {tar} is not readable "
                          f"Parquet ({exc}); delete it to read the tar alone") from exc
    return table


def _sidecar_rows(file: ShardFile) -> list[dict]:
    table = read_sidecar(file.sidecar, file.path)
    rows = []
    for i, rec in enumerate(table.to_pylist()):
        status = rec.get("status") or STATUS_OK
        rows.append({"id": file.offset + i, "key": _text(rec.get("key")), "url": _text(rec.get("url")),
                     "caption": _text(rec.get("caption")), "status": status if status in STATUSES
                     else "failed_to_download", "error_message": rec.get("error_message")})
    return rows[:file.rows]


def read(file: ShardFile, cfg):
    """Rows of one tar (see the module docstring), image bytes on rows to embed."""
    expected = {r["key"]: r for r in _sidecar_rows(file)} if file.sidecar else None
    seen, n = set(), 0
    try:
        for key, sample in _samples(file.path):
            if key in seen:
                log.warning("%s: sample %r twice; the first is kept", file.path, key)
                continue
            seen.add(key)
            if expected is None:
                if n < file.rows:
                    yield _sample_row(file.offset + n, key, sample, file.path, None)
                n += 1
            elif key in expected and expected[key]["status"] == STATUS_OK:
                yield _sample_row(expected[key]["id"], key, sample, file.path, expected[key])
            else:
                log.warning("%s: sample %r is not a success row of %s; skipped", file.path, key,
                            file.sidecar)
        error = None
    except TAR_ERRORS as exc:
        error = f"{file.path}: tar unreadable after {len(seen)} sample(s) ({type(exc).__name__}: {exc})"
        log.warning(error)
    for key, r in (expected or {}).items():
        if key not in seen:
            failed = r["status"] != STATUS_OK
            yield row(r["id"], url=r["url"], caption=r["caption"], key=key,
                      status=r["status"] if failed else FAILED,
                      error=r["error_message"] if failed else
                      error or f"{file.path}: sample {key!r} is not in the tar")
    if expected is None and error:
        for i in range(n, file.rows):
            yield row(file.offset + i, status=FAILED, error=error)


class Source(ForeignSource):
    """PBegin -> (shard, embedded rows), one shard per tar."""

    def __init__(self, job):
        super().__init__(job, read)
