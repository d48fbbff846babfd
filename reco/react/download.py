"""``reco react-download``: the customisation set's images as webdataset shards.

Two ways, chosen by ``react.reuse``:

* download (default): a Beam job (DirectRunner unless ``--beam`` flags say otherwise) on the
  embed path's own transforms: the set's rows in shards of ``react.shard_size`` ->
  :class:`~reco.pipelines.urls.FilterUnsafeUrls` -> :class:`~reco.pipelines.download.DownloadShards`
  (img2dataset behind the network guard, resized to the model's input size, ``embed.*`` options:
  threads, timeout, retries, encode_format, allow_networks) -> one tar + results Parquet per shard
  (:class:`~reco.react.shards.ShardWriter`);
* reuse: an existing img2dataset webdataset download (``react.reuse``: folder/glob of ``.tar``,
  read through the ``webdataset`` input kind of embed-memory, sidecars honoured) is streamed once;
  a sample whose key or URL is a row of the set is copied into the output shards, its image
  bytes unchanged (JPEG, PNG, WebP; other formats become PNG). No network.

Either way every row of the set gets a status in ``{shard}.parquet`` (failures with their message),
and ``download.json`` sums them up. A finished shard (its tar and parquet present) is not redone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa

from reco.config import RecoConfig
from reco.errors import ConfigError
from reco.formats import STATUS_OK, atomic_write_text
from reco.options import value_flags

log = logging.getLogger(__name__)
INFO_FILE = "download.json"


def default_shards_dir(cfg: RecoConfig) -> Path:
    return Path(cfg.react.shards) if cfg.react.shards else cfg.paths.react / "shards"


def set_rows(table: pa.Table) -> list[dict]:
    """Rows of the customisation set in the shape the embed path's transforms take."""
    cols = {c: table.column(c).to_pylist() for c in ("url", "caption", "key", "class_id")}
    return [{"id": i, "url": u, "caption": c, "key": k, "class_id": cls, "label": None,
             "status": None, "error_message": None}
            for i, (u, c, k, cls) in enumerate(zip(*cols.values()))]


def _done(out: Path, shard: int) -> bool:
    return (out / f"{shard:05d}.tar").is_file() and (out / f"{shard:05d}.parquet").is_file()


class _WriteShard(beam.DoFn):
    def __init__(self, out: str, encode_format: str):
        self.out, self.fmt = out, encode_format

    def process(self, element):
        from reco.pipelines.download import IMAGE_KEY
        from reco.react.shards import ShardWriter

        shard, rows = element
        writer = ShardWriter(self.out, shard, self.fmt)
        for row in rows:
            writer.add(row, row.get(IMAGE_KEY) if row["status"] == STATUS_OK else None)
        yield writer.close()


def download_shards(cfg: RecoConfig, rows: list[dict], out: Path, image_size: int,
                    beam_options=None) -> list[dict]:
    """Beam job: shards of rows -> guard -> img2dataset -> tar shards; per-shard summaries."""
    from reco.pipelines.download import DownloadShards
    from reco.pipelines.embed_memory import pipeline_options
    from reco.pipelines.urls import FilterUnsafeUrls

    size = cfg.react.shard_size
    shards = [(s, rows[i:i + size]) for s, i in enumerate(range(0, len(rows), size))
              if not _done(out, s)]
    if not shards:
        return []
    with beam.Pipeline(options=pipeline_options(cfg.embed, beam_options)) as pipeline:
        _ = (pipeline
             | "Shards" >> beam.Create(shards)
             | "SafetyFilter" >> FilterUnsafeUrls(cfg.embed.allow_networks)
             | "Download" >> DownloadShards(image_size, cfg.embed)
             | "WriteTars" >> beam.ParDo(_WriteShard(str(out), cfg.embed.encode_format)))
    return [{"shard": s} for s, _ in shards]


def reuse_download(cfg: RecoConfig, rows: list[dict], out: Path, source: str) -> list[dict]:
    """Copy the set's samples out of an existing img2dataset webdataset download (by key or URL);
    rows it does not hold are failed rows naming it."""
    from reco.pipelines import source_webdataset
    from reco.pipelines.inputs import resolve_inputs
    from reco.react.shards import ShardWriter

    kind, files = resolve_inputs(source, dataclasses.replace(cfg.embed, input_format="webdataset"))
    by_key = {r["key"]: r for r in rows}
    by_url = {r["url"]: r for r in rows}
    found: set[str] = set()
    writer, shard, summaries = None, 0, []
    for file in files:
        for rec in source_webdataset.read(file, cfg.embed):
            row = by_key.get(rec.get("key")) or by_url.get(rec.get("url"))
            if row is None or row["key"] in found or rec["status"] != STATUS_OK:
                continue
            found.add(row["key"])
            writer = writer or ShardWriter(out, shard, "jpg")
            suffix, image = image_member(rec["image"])
            writer.add({**row, "status": STATUS_OK}, image, suffix)
            if len(writer.rows) >= cfg.react.shard_size:
                summaries.append(writer.close())
                writer, shard = None, shard + 1
    missing = [r for r in rows if r["key"] not in found]
    for row in missing:
        writer = writer or ShardWriter(out, shard, "jpg")
        writer.add({**row, "status": "failed_to_download",
                    "error_message": f"{source}: no sample with key {row['key']!r} or url {row['url']!r}"}, None)
        if len(writer.rows) >= cfg.react.shard_size:
            summaries.append(writer.close())
            writer, shard = None, shard + 1
    if writer is not None:
        summaries.append(writer.close())
    return summaries


MAGIC = {b"\xff\xd8\xff": "jpg", b"\x89PNG": "png"}


def image_member(data: bytes) -> tuple[str, bytes]:
    """(member suffix, bytes) of a reused image: JPEG, PNG and WebP stay as they were downloaded
    (no second lossy encoding: a JPEG round trip of a small image shifts its colours); any other
    format is re-encoded losslessly as PNG."""
    import io

    from PIL import Image

    for magic, suffix in MAGIC.items():
        if data.startswith(magic):
            return suffix, data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", data
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue()


def react_download(cfg: RecoConfig, *, customisation: str | Path | None = None,
                   out: str | Path | None = None, image_size: int | None = None,
                   beam_options=None) -> tuple[Path, dict[str, Any]]:
    """Images of the customisation set -> webdataset shards in ``out`` (default
    ``react.shards`` or ``WORKDIR/react/shards``). Returns (folder, info with status counts)."""
    from reco.pipelines.source_webdataset import read_sidecar
    from reco.react.retrieve import SET_FILE, read_customisation_set

    table = read_customisation_set(customisation or cfg.paths.react / SET_FILE)
    if "key" not in table.column_names:
        raise ConfigError(f"{customisation}: no 'key' column; rerun react-retrieve")
    out = Path(out) if out else default_shards_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = set_rows(table)
    if cfg.react.reuse:
        reuse_download(cfg, rows, out, cfg.react.reuse)
    else:
        if image_size is None:
            from reco.react.retrieve import load_frozen_clip
            image_size = load_frozen_clip(cfg).image_size
        download_shards(cfg, rows, out, int(image_size), beam_options)
    results = pa.concat_tables([read_sidecar(str(p), str(p.with_suffix(".tar")), columns=["status"])
                                for p in sorted(out.glob("[0-9]*.parquet"))])
    statuses = results.column("status").to_pylist()
    info = {"out": str(out), "rows": len(rows), "mode": "reuse" if cfg.react.reuse else "download",
            "status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
            "tars": len(list(out.glob("[0-9]*.tar")))}
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    log.info("react-download: %s", info)
    return out, info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    value_flags(parser, ("--customisation", "PATH", "customisation set (default: WORKDIR/react/customisation.parquet)"),
                ("--out", "PATH", "shard folder (default: react.shards or WORKDIR/react/shards)"))


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    _, info = react_download(cfg, customisation=args.customisation, out=args.out)
    print(json.dumps(info, indent=2))
    return 0 if info["status_counts"].get(STATUS_OK) else 1
