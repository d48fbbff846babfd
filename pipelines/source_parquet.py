"""Input kind ``parquet-images`` (:mod:`reco.pipelines.inputs`): Parquet with image bytes, as
img2dataset writes with ``output_format="parquet"``: one row per input row, the re-encoded image
in a column named after its encoding (``jpg``, ``png``, ``webp``; ``embed.image_col`` names
another), the caption in ``caption`` (``embed.caption_col``) or ``txt``, and ``url``, ``key``,
``status``, ``error_message`` carried when present.

One file is one output shard, read a record batch at a time (``iter_batches``: one row group in
memory); rows of a row group that cannot be read are ``failed_to_embed`` with the reason. A row without image bytes keeps img2dataset's status and message (a failed download),
or is ``failed_to_download`` ("no image bytes"); a null caption is embedded as the empty text,
as in URL lists; undecodable bytes become ``failed_to_embed`` when embedded.
"""
from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.formats import STATUS_OK, STATUSES
from reco.pipelines.foreign import ForeignSource, num_shards, row  # noqa: F401
from reco.pipelines.inputs import ShardFile, image_column

READ_ERRORS = (OSError, EOFError, ValueError)


def _columns(path: str, names: list[str], types: dict, cfg) -> tuple[tuple[str, str], ...]:
    image = image_column(names, types, cfg.image_col)
    caption = next((c for c in (cfg.caption_col, "caption", "txt") if c and c in names), None)
    if image is None:
        raise FormatError(f"{path}: no image-bytes column ({cfg.image_col or 'jpg/png/webp'}; has "
                          f"{names}); set embed.image_col, or it is a URL list (--input-format urls)")
    if caption is None:
        raise FormatError(f"{path}: no caption column ({cfg.caption_col!r} or 'txt'; has {names}); "
                          f"set embed.caption_col")
    roles = {"image": image, "caption": caption, "url": cfg.url_col, "key": "key",
             "status": "status", "error_message": "error_message"}
    return tuple((role, col) for role, col in roles.items() if col in names)


def inspect(files: list[str], cfg) -> list[ShardFile]:
    out, offset = [], 0
    for shard, path in enumerate(files):
        try:
            with fsspec.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
                schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except READ_ERRORS as exc:
            raise FormatError(f"{path}: not a readable Parquet file ({exc})") from exc
        types = {n: schema.field(n).type for n in schema.names}
        out.append(ShardFile(path, rows, offset, shard, columns=_columns(path, schema.names, types, cfg)))
        offset += rows
    return out


def _text(value) -> str | None:
    return None if value is None else value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _row(id_: int, rec: dict) -> dict:
    caption = _text(rec.get("caption"))
    common = {"url": _text(rec.get("url")), "caption": caption, "key": _text(rec.get("key"))}
    if rec.get("image"):
        return row(id_, **common, image=rec["image"])
    status = rec.get("status")
    failed = status if status in STATUSES and status != STATUS_OK else "failed_to_download"
    return row(id_, **common, status=failed, error=rec.get("error_message") or "no image bytes")


def read(file: ShardFile, cfg):
    """Rows of one file, a record batch at a time; the file must still have its inspected rows."""
    roles = dict(file.columns)
    rename = {col: role for role, col in roles.items()}
    n = 0
    try:
        with fsspec.open(file.path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=max(1, cfg.batch_size),
                                                        columns=list(rename)):
                for rec in batch.to_pylist():
                    if n < file.rows:
                        yield _row(file.offset + n, {rename[k]: v for k, v in rec.items()})
                    n += 1
    except READ_ERRORS as exc:             # a corrupt row group: its rows and the rest fail
        error = f"{file.path}: unreadable after {n} row(s) ({type(exc).__name__}: {exc})"
        for i in range(n, file.rows):
            yield row(file.offset + i, status="failed_to_embed", error=error)


class Source(ForeignSource):
    """PBegin -> (shard, embedded rows), one shard per Parquet file."""

    def __init__(self, job):
        super().__init__(job, read)
