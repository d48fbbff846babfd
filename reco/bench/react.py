"""Benchmark of ``react-train``: streaming from webdataset shards vs an in-memory tensor.

A synthetic customisation set of ``n`` coloured-square JPEGs (32 px, captions naming the colour) is
written twice: as ``react-download``'s tar shards (:class:`reco.react.shards.ShardWriter`) and as
files in the world's layout (``urls/set.parquet`` row i -> ``images/set/{i:06d}.png``, JPEG
bytes) for the in-memory ``world`` source (which decodes the whole set into one
tensor first). A random-init ``reco-tiny`` CLIP is trained for the same steps in a fresh process
per run (torch on one thread; the stream with ``react.workers`` DataLoader workers). Per run:
training samples/s after the first ``WARM_STEPS`` steps (loop only: the DataLoader worker's
start, the in-memory run's decode and the stream's one-off caption embedding are left out) and
the process's own peak RSS (VmHWM).

``throughput_ratio``: stream / in-memory samples/s at ``n``, paired and interleaved over
``rounds`` rounds of fresh processes (:mod:`reco.bench.paired`; goal >= 0.9);
``stream_rss_ratio = peak(10 n) / peak(n)`` for the stream (goal: flat, <= 1.1), beside the
in-memory run's, which grows. Both are rows of ``summary.md``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60), "yellow": (230, 210, 30)}
_CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from reco import config as config_lib
from reco.react.config import ReactConfig
from reco.react.train import react_train
root, mode, steps, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = config_lib.preset("tiny", workdir=root + "/work")
cfg = config_lib.override(cfg, ["clip.model=" + open(root + "/clip.spec").read()])
import dataclasses
o = ReactConfig(steps=steps, batch_size=64, warmup_steps=5, checkpoint_every=10**6, log_every=10**6,
                image_source=mode, shards=root + "/shards", workers=workers, shuffle_buffer=512)
cfg = dataclasses.replace(cfg, react=o)
info = react_train(cfg, out_dir=root + "/out-" + mode, customisation=root + "/set.parquet",
                   evaluate=False)
def peak_mb():           # VmHWM: this process's own peak (ru_maxrss may be the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rate": info["steady_samples_per_s"], "samples_per_s": info["samples_per_s"],
                  "decode_seconds": info["decode_seconds"],
                  "pairs": info["pairs"],
                  "peak_rss_mb": peak_mb()}))
"""


def _jpeg(colour, rng) -> bytes:
    from PIL import Image

    img = rng.integers(90, 140, size=(32, 32, 3)).astype(np.uint8)
    x, y = rng.integers(0, 16, size=2)
    img[y:y + 16, x:x + 16] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_set(root: Path, n: int, shard_size: int = 500, seed: int = 0) -> None:
    """``n`` samples as tar shards (``root/shards``) and as world-layout files + set Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco.react.shards import ShardWriter

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows, writer = [], None
    for i in range(n):
        name = names[i % len(names)]
        image = _jpeg(COLOURS[name], rng)
        rel = f"images/set/{i:06d}.png"        # the world layout: row i of urls/set.parquet
        path = root / "work" / "world" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        row = {"key": f"{i:09d}", "url": f"http://127.0.0.1:9/{rel}", "caption": f"a {name} square",
               "class_id": i % len(names), "status": "success", "error_message": None}
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = ShardWriter(root / "shards", i // shard_size)
        writer.add(row, image)
        rows.append({**row, "memory_id": i})
    writer.close()
    (root / "work" / "world" / "urls").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": [r["url"] for r in rows]}),
                   root / "work" / "world" / "urls" / "set.parquet")
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("url", "caption", "key", "memory_id",
                                                            "class_id")} for r in rows]),
                   root / "set.parquet")


def _argv(root: Path, mode: str, steps: int, workers: int) -> list[str]:
    return ["-c", _CHILD, str(root), mode, str(steps), str(workers)]


def _make_set(out_dir: Path, size: int) -> Path:
    import shutil

    import torch

    from reco.clip import load_clip, save_local_dir

    root = out_dir / f"set-{size}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    (root / "clip.spec").write_text(save_local_dir(load_clip("reco-tiny").model, "reco-tiny", root / "base"))
    write_set(root, size)
    return root


def bench_react(out_dir: Path, quick: bool = True, rounds: int | None = None) -> dict:
    import shutil

    from reco.bench.paired import ROUNDS, Claim, paired, run_child

    n, steps, workers = (1000, 100, 1) if quick else (5000, 300, 2)
    rounds = rounds or ROUNDS["quick" if quick else "full"]
    out_dir = Path(out_dir)
    results = {"n": n, "steps": steps, "batch_size": 64, "workers": workers, "runs": {}}
    root = _make_set(out_dir, n)
    stats = paired(_argv(root, "shards", steps, workers), _argv(root, "world", steps, workers), rounds,
                   timeout=1800)
    results["paired"] = stats
    results["runs"][f"shards-{n}"], results["runs"][f"world-{n}"] = stats["pairs"][0]["a"], stats["pairs"][0]["b"]
    shutil.rmtree(root, ignore_errors=True)
    root = _make_set(out_dir, 10 * n)
    for mode in ("shards", "world"):
        results["runs"][f"{mode}-{10 * n}"] = run_child(_argv(root, mode, steps, workers), 1800)
    shutil.rmtree(root, ignore_errors=True)
    runs = results["runs"]
    results["throughput_ratio"] = stats["ratio"]["median"]
    peak = {k: max(p[side]["peak_rss_mb"] for p in stats["pairs"])
            for k, side in ((f"shards-{n}", "a"), (f"world-{n}", "b"))}
    results["stream_rss_ratio"] = round(runs[f"shards-{10 * n}"]["peak_rss_mb"] / peak[f"shards-{n}"], 3)
    results["memory_rss_ratio"] = round(runs[f"world-{10 * n}"]["peak_rss_mb"] / peak[f"world-{n}"], 3)
    command = "reco bench --only react"
    results["claims"] = [
        Claim.from_paired(f"react-train streaming shards / in-memory tensor, {n:,} pairs", stats, 0.9,
                          "samples/s", "stream", "in memory", command).as_dict(),
        Claim(f"react-train stream peak RSS, {10 * n:,} / {n:,} pairs", results["stream_rss_ratio"], 1.1,
              at_most=True, rates=f"{runs[f'shards-{10 * n}']['peak_rss_mb']:,.0f} vs "
              f"{peak[f'shards-{n}']:,.0f} MB (in memory: {results['memory_rss_ratio']}x)",
              command=command).as_dict()]
    return results
