"""Export test data into the foreign formats reco reads, as the tools of the field write them.

* :func:`write_webdataset`: img2dataset's webdataset output (``{shard}.tar`` of ``{key}.png`` +
  ``{key}.txt`` + ``{key}.json`` for the downloaded samples, ``{shard}.parquet`` with every input
  row, failures included, and ``{shard}_stats.json``), written with webdataset's ``TarWriter``;
* :func:`write_parquet_images`: img2dataset's parquet output (image bytes in a ``png`` column);
* :func:`write_release`: a clip-retrieval embedding release (``img_emb/img_emb_N.npy``,
  ``text_emb/text_emb_N.npy``, ``metadata/metadata_N.parquet``) from an embedded folder;
* :func:`world_samples`: the samples of a generated-world split (url, caption, image bytes of
  the file that serves the url, or None for a dead link).

A sample is a dict ``{key, url, caption, image (bytes or None), status, error_message}``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def world_samples(cfg, split: str) -> list[dict]:
    """One sample per row of the world's URL list of ``split`` (dead links: image None)."""
    from reco.react.images import world_file

    table = pq.read_table(cfg.paths.urls(split), columns=["url", "caption"])
    out = []
    for i, (url, caption) in enumerate(zip(*(table.column(c).to_pylist() for c in ("url", "caption")))):
        path = world_file(cfg.paths.world, url)
        image = path.read_bytes() if path.is_file() else None
        out.append({"key": f"{i:09d}", "url": url, "caption": caption, "image": image,
                    "status": "success" if image else "failed_to_download",
                    "error_message": None if image else "404 Not Found"})
    return out


def _chunks(samples: list[dict], per_shard: int):
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        yield shard, samples[start:start + per_shard]


def _meta_table(rows: list[dict]) -> pa.Table:
    return pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
                     "key": [r["key"] for r in rows], "status": [r["status"] for r in rows],
                     "error_message": [r["error_message"] for r in rows]})


def write_webdataset(samples: list[dict], out: Path, per_shard: int, *, sidecar: bool = True,
                     drop: dict[str, str] | None = None) -> list[Path]:
    """img2dataset-style webdataset shards; ``drop`` maps a key to the member suffix to leave
    out of its sample (a corrupt download: ``{"000000003": "txt"}``). Returns the tar paths."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    drop = drop or {}
    tars = []
    for shard, rows in _chunks(samples, per_shard):
        tar = out / f"{shard:05d}.tar"
        with wds.TarWriter(str(tar)) as sink:
            for r in rows:
                if r["image"] is None:
                    continue                     # img2dataset writes only what it downloaded
                sample = {"__key__": r["key"], "png": r["image"], "txt": r["caption"] or "",
                          "json": json.dumps({k: r[k] for k in ("url", "caption", "key", "status")})}
                sample.pop(drop.get(r["key"], ""), None)
                sink.write(sample)
        if sidecar:
            pq.write_table(_meta_table(rows), out / f"{shard:05d}.parquet")
            ok = sum(r["image"] is not None for r in rows)
            (out / f"{shard:05d}_stats.json").write_text(json.dumps(
                {"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok}))
        tars.append(tar)
    return tars


def write_parquet_images(samples: list[dict], out: Path, per_shard: int) -> list[Path]:
    """img2dataset-style parquet output: one row per sample, image bytes in ``png``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, rows in _chunks(samples, per_shard):
        table = _meta_table(rows).append_column(
            "txt", pa.array([r["caption"] if r["image"] else None for r in rows], pa.string()))
        table = table.append_column("png", pa.array([r["image"] for r in rows], pa.binary()))
        files.append(out / f"{shard:05d}.parquet")
        pq.write_table(table, files[-1], row_group_size=50)
    return files


def write_release(embedded: Path, out: Path, parts: int, *, dtype: str = "float16",
                  sides: tuple[str, ...] = ("image", "text")) -> int:
    """A clip-retrieval release of the success rows of an embedded folder, in ``parts`` parts
    (numbered 0..parts-1, unpadded like clip-retrieval). Returns the number of rows."""
    from reco.formats import Manifest, decode_vectors

    manifest = Manifest.read(embedded, kind="embedded")
    dim = manifest.info["dim"]
    tables = [pq.read_table(p) for p in manifest.shard_paths(embedded)]
    table = pa.concat_tables(tables)
    table = table.filter(pa.compute.equal(table.column("status"), "success"))
    vectors = {side: decode_vectors(table.column(f"{side}_emb"), dim).astype(dtype)
               for side in ("image", "text")}
    folders = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}
    n = table.num_rows
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for side in sides:
            folder, prefix = folders[side]
            (out / folder).mkdir(parents=True, exist_ok=True)
            np.save(out / folder / f"{prefix}_{part}.npy", np.ascontiguousarray(vectors[side][a:b]))
        (out / "metadata").mkdir(parents=True, exist_ok=True)
        meta = table.slice(a, b - a).select(["url", "caption"])
        meta = meta.append_column("key", pa.array([f"{i:09d}" for i in range(a, b)]))
        pq.write_table(meta, out / "metadata" / f"metadata_{part}.parquet")
    return n
