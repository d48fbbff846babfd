"""Benchmark of ``reco import-embeddings``: peak memory stays flat as the release grows.

A clip-retrieval release (``img_emb/``, ``text_emb/``, ``metadata/``; float16, 512-d like
ViT-B/32's, ``parts`` parts of ``rows`` rows) is written, then imported in a fresh process for
the model ``ViT-B-32`` (only its config is read: no weights). Per size: the process's peak RSS
(``ru_maxrss``), its RSS once everything is imported but before the import runs (the baseline:
torch, open_clip, pyarrow), and rows/s. Sizes are 1x and 10x the parts at the same shard size;
``rss_ratio = peak(10x) / peak(1x)`` (flat: about 1).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 512
_CHILD = """
import json, resource, sys, time
from reco.pipelines import import_embeddings as imp
import embedding_reader, open_clip  # noqa: F401  (the baseline holds every import)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
_, info = imp.import_embeddings(sys.argv[1], sys.argv[2], model="ViT-B-32", pretrained="openai",
                                shard_size=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t, "rows": int(info["rows"]),
                  "baseline_rss_mb": base / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_release(root: Path, parts: int, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for n in range(parts):
        for folder in ("img_emb", "text_emb"):
            x = rng.standard_normal((rows, DIM)).astype(np.float32)
            np.save(root / folder / f"{folder}_{n}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True))
                    .astype(np.float16))
        pq.write_table(pa.table({"url": [f"https://example.com/{n}/{i}.jpg" for i in range(rows)],
                                 "caption": [f"a caption of part {n} row {i}" for i in range(rows)]}),
                       root / "metadata" / f"metadata_{n}.parquet")


def _measure(release: Path, out: Path, shard_size: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(release), str(out), str(shard_size)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows_per_s"] = round(result["rows"] / result["seconds"])
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}


def bench_import(out_dir: Path, quick: bool = True) -> dict:
    parts, rows, shard = (2, 10_000, 5_000) if quick else (4, 25_000, 10_000)
    out_dir = Path(out_dir)
    results = {"dim": DIM, "rows_per_part": rows, "shard_size": shard}
    try:
        for scale in (1, 10):
            release = out_dir / f"release-{scale}x"
            shutil.rmtree(release, ignore_errors=True)
            write_release(release, parts * scale, rows)
            results[f"{scale}x"] = {"parts": parts * scale,
                                    **_measure(release, out_dir / f"memory-{scale}x", shard)}
            shutil.rmtree(release, ignore_errors=True)
            shutil.rmtree(out_dir / f"memory-{scale}x", ignore_errors=True)
    finally:
        for p in out_dir.glob("release-*"):
            shutil.rmtree(p, ignore_errors=True)
    results["rss_ratio"] = round(results["10x"]["peak_rss_mb"] / results["1x"]["peak_rss_mb"], 3)
    results["rss_growth_mb"] = round(results["10x"]["peak_rss_mb"] - results["1x"]["peak_rss_mb"], 1)
    return results
