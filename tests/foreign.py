"""Export test data into the foreign formats reco reads, as the tools of the field write them.

* :func:`write_webdataset`: img2dataset's webdataset output (``{shard}.tar`` of ``{key}.png`` +
  ``{key}.txt`` + ``{key}.json`` for the downloaded samples, ``{shard}.parquet`` with every input
  row, failures included, and ``{shard}_stats.json``), written with webdataset's ``TarWriter``;
* :func:`write_parquet_images`: img2dataset's parquet output (image bytes in a ``png`` column);
* :func:`write_release`: a clip-retrieval embedding release (``img_emb/img_emb_N.npy``,
  ``text_emb/text_emb_N.npy``, ``metadata/metadata_N.parquet``) from an embedded folder;
* :func:`world_samples`: the samples of a generated-world split (url, caption, image bytes of
  the file that serves the url, or None for a dead link);
* :func:`write_image_folder`, :func:`write_clip_benchmark_wds`: labelled test images as an
  ImageFolder and in CLIP_benchmark's webdataset layout;
* :func:`run_watched`, :func:`run_reco`: a command (or ``reco`` subcommands in one process, with
  a ``memory://`` bucket filled before and read after) in a fresh process that reports the
  ``reco.world`` modules it imported.

A sample is a dict ``{key, url, caption, image (bytes or None), status, error_message}``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Written into PYTHONPATH: every child process reports the reco.world modules it imported.
SITECUSTOMIZE = """
import atexit, os, sys
def _report():
    with open(os.environ["RECO_MODULES_OUT"], "w") as f:
        f.write("\\n".join(m for m in sys.modules if m == "reco.world" or m.startswith("reco.world.")))
atexit.register(_report)
"""


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


def write_image_folder(folder: Path, samples) -> None:
    """``folder/<label:02d>/<i>.<ext>`` from ``[(image path, label)]`` (ImageFolder layout)."""
    for i, (path, label) in enumerate(samples):
        dest = folder / f"{label:02d}" / f"{i:05d}{path.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())


def write_clip_benchmark_wds(root: Path, samples, classnames: str, templates: str,
                             shards: int = 2) -> None:
    """CLIP_benchmark's wds layout of ``[(image path, label)]``: ``test/{0..}.tar`` +
    ``nshards.txt``, ``classnames.txt`` and ``zeroshot_classification_templates.txt``."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    size = -(-len(samples) // shards)
    for shard in range(shards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for i, (path, label) in enumerate(samples[shard * size:(shard + 1) * size]):
                sink.write({"__key__": f"s{shard}_{i:05d}", "png": path.read_bytes(), "cls": label})
    (root / "test" / "nshards.txt").write_text(str(shards))
    (root / "classnames.txt").write_text(classnames)
    (root / "zeroshot_classification_templates.txt").write_text(templates)


def run_watched(argv: list[str], cwd: Path, *, env: dict | None = None,
                timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``argv`` in a fresh process (must succeed); returns it and the ``reco.world``
    modules it imported (reported at exit by a sitecustomize on its PYTHONPATH)."""
    with tempfile.TemporaryDirectory(prefix="reco-watched-") as scratch:
        (Path(scratch) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        out = Path(scratch) / "modules.txt"
        env = {**os.environ, **(env or {}), "RECO_MODULES_OUT": str(out),
               "PYTHONPATH": os.pathsep.join([scratch, str(REPO)])}
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc, [m for m in out.read_text().splitlines() if m]


def run_reco(commands: list[list[str]], cwd: Path, *, upload: dict[str, str] | None = None,
             download: dict[str, str] | None = None, timeout: int = 600) -> dict:
    """Run ``reco`` subcommands in one fresh process; ``upload`` ({local folder: memory:// URL})
    fills the process's ``memory://`` bucket first, ``download`` ({URL: local folder}) copies
    from it last. Returns the ``reco.world`` modules the process imported and its stdout."""
    script = ("import fsspec\nfrom reco.cli import main\nbucket = fsspec.filesystem('memory')\n"
              f"for src, dst in {sorted((upload or {}).items())!r}:\n"
              "    bucket.put(src.rstrip('/') + '/', dst, recursive=True)\n"
              f"for argv in {commands!r}:\n"
              "    rc = main(argv)\n"
              "    assert rc == 0, (argv, rc)\n"
              f"for src, dst in {sorted((download or {}).items())!r}:\n"
              "    bucket.get(src.rstrip('/') + '/', dst, recursive=True)\n")
    proc, modules = run_watched([sys.executable, "-c", script], cwd,
                                env={"NO_ALBUMENTATIONS_UPDATE": "1"}, timeout=timeout)
    return {"world_modules": modules, "stdout": proc.stdout}
