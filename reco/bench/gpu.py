"""GPU benchmark (``make bench-gpu``): ready for a lent GPU, skipped with a message without one.

Three figures, each with the project's own code on the GPU:

* ``embed``: ViT-B-32 (random init, ``pretrained=None``: no download) images/s of
  :func:`reco.clip.encode_images` on 224-px pixels held on the host (pinned copy, cast, autocast
  as the embed stage does), beside the raw forward on pixels already on the GPU. Goal >= 2,500
  images/s on an H100-class GPU.
* ``knn``: faiss-gpu k-nearest-neighbour search of 1M queries against a 1M x 512-d memory (the
  ``index.use_gpu`` key family of ``reco.index.keys``, k-means trained on the GPU by
  ``reco.index.build.train_on_gpus``, moved by ``reco.index.memory.to_gpu``), queries/s and
  recall@10 against exact GPU search, at several nprobe. Skipped when faiss has no GPU.
* ``train``: the fusion trainer's steps/s on the GPU (``reco.bench.train.throughput``: in-memory
  batches and streamed Parquet shards, pinned).

Run: ``make bench-gpu`` (= ``reco bench --only gpu --full``: results in
``bench-results/results.json`` and ``bench-results/gpu/gpu.json``), or
``python -m reco.bench.gpu --size tiny|quick|full --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NO_GPU = "no GPU: skipped"
# size -> embed images, embed batch, memory items, queries, dim, trainer (rows, batch, steps, loader workers)
SIZES = {
    "tiny": dict(images=32, batch=16, memory=20_000, queries=20_000, dim=64, train=(2048, 256, 3, 0)),
    "quick": dict(images=4096, batch=256, memory=200_000, queries=200_000, dim=512, train=(40_000, 2048, 50, 2)),
    "full": dict(images=16_384, batch=512, memory=1_000_000, queries=1_000_000, dim=512,
                 train=(100_000, 4096, 200, 2)),
}
EMBED_GOAL = 2500


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(n: int, fn, repeat: int = 3) -> float:
    """Items/s of fn() (best of ``repeat`` after a warm-up; synchronised)."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def bench_embed_gpu(size: dict, options: dict, device: str = "cuda") -> dict:
    import torch

    from reco.clip import autocast, encode_images, input_dtype, load_clip

    model, precision = options.get("clip.model", "ViT-B-32"), options.get("clip.precision", "fp16")
    device = options.get("clip.device", device)
    n, batch = size["images"], options.get("embed.batch_size", size["batch"])
    torch.manual_seed(0)
    clip = load_clip(model, options.get("clip.pretrained"), device=device, precision=precision)
    pool = [torch.randn(batch, 3, clip.image_size, clip.image_size) for _ in range(4)]   # host batches
    on_device = [x.to(device, input_dtype(clip)) for x in pool]
    steps = range(max(n // batch, 1))

    def stage():
        for s in steps:
            encode_images(clip, pool[s % len(pool)])

    @torch.no_grad()
    def raw():
        with autocast(clip, torch.device(device)):
            for s in steps:
                clip.model.encode_image(on_device[s % len(pool)])

    out = {"model": model, "pretrained": options.get("clip.pretrained"), "precision": precision,
           "device": _device_name(device), "image_size": clip.image_size,
           "images": len(steps) * batch, "batch": batch,
           "encode_images_per_s": _rate(len(steps) * batch, stage),
           "raw_forward_images_per_s": _rate(len(steps) * batch, raw)}
    out["goal_images_per_s"] = EMBED_GOAL
    out["goal_met"] = out["encode_images_per_s"] >= EMBED_GOAL
    return out


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def bench_knn_gpu(size: dict, k: int = 20) -> dict:
    import faiss

    from reco.index.build import train_on_gpus
    from reco.index.config import IndexConfig
    from reco.index.keys import choose_index_key
    from reco.index.memory import to_gpu
    from reco.index.synthetic import clustered_pairs

    if not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        return {"skipped": "faiss has no GPU (faiss-cpu installed?): skipped; pip install '.[gpu]'"}
    n, dim, nq = size["memory"], size["dim"], size["queries"]
    memory, _, _, centers = clustered_pairs(n, dim, max(n // 1000, 10), seed=0)
    queries, _, _, _ = clustered_pairs(nq, dim, len(centers[0]), seed=1, centers=centers)
    plan = choose_index_key(n, dim, IndexConfig(max_index_memory_usage="64G"), gpu=True)
    t0 = time.perf_counter()
    index = to_gpu(train_on_gpus(memory, plan), True)
    build_s = time.perf_counter() - t0
    exact = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
    exact.add(memory)
    check = queries[:10_000]
    truth = exact.search(check, 10)[1]
    out = {"memory": n, "dim": dim, "queries": nq, "k": k, "key": plan.key, "gpus": faiss.get_num_gpus(),
           "build_seconds": round(build_s, 1), "exact_queries_per_s": _search_rate(exact, queries[:100_000], k),
           "nprobe": []}
    params = faiss.GpuParameterSpace()
    for nprobe in (16, 32, 64):
        params.set_index_parameter(index, "nprobe", nprobe)
        found = index.search(check, 10)[1]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        out["nprobe"].append({"nprobe": nprobe, "recall_at_10": round(recall, 4),
                              "queries_per_s": _search_rate(index, queries, k)})
    return out


def _search_rate(index, queries: np.ndarray, k: int, batch: int = 65_536) -> float:
    """Queries/s of searching all ``queries`` in batches (results copied back to the host)."""
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        index.search(queries[s:s + batch], k)
    return round(len(queries) / (time.perf_counter() - t0), 1)


def bench_train_gpu(size: dict, options: dict, work: Path, device: str = "cuda") -> dict:
    from reco.bench.train import _write, throughput

    rows, batch, steps, workers = size["train"]
    batch = options.get("train.batch_size", batch)
    _write(work / "tensors", rows, size["dim"], 10)
    return {"rows": rows, "dim": size["dim"], "k": 10,
            **throughput(work / "tensors", batch=batch, steps=steps, workers=workers, device=device)}


def bench_gpu(out_dir: str | Path, quick: bool = True, options: dict | None = None,
              size: str | None = None, device: str | None = None) -> dict:
    """Run the GPU benchmark (``size``: tiny | quick | full; default from ``quick``), write
    ``gpu.json`` into ``out_dir``; without a CUDA device: ``{"skipped": "no GPU: skipped ..."}``.
    ``device="cpu"`` runs the same code on the CPU (a smoke test of the script, not a figure)."""
    import torch

    from reco.formats import atomic_write_text

    out_dir, options = Path(out_dir), options or {}
    size = size or ("quick" if quick else "full")
    device = device or options.get("clip.device") or ("cuda" if torch.cuda.is_available() else None)
    results: dict = {"size": size, "device": device}
    if device is None:
        results["skipped"] = f"{NO_GPU} (torch sees no CUDA device)"
        print(results["skipped"], flush=True)
    else:
        sizes = SIZES[size]
        results["embed"] = bench_embed_gpu(sizes, options, device)
        results["knn"] = bench_knn_gpu(sizes)
        if "skipped" in results["knn"]:
            print(results["knn"]["skipped"], flush=True)
        with tempfile.TemporaryDirectory(prefix="reco-bench-gpu-") as tmp:
            results["train"] = bench_train_gpu(sizes, options, Path(tmp), device)
    atomic_write_text(out_dir / "gpu.json", json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reco.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default="bench-results/gpu", help="folder for gpu.json")
    args = parser.parse_args(argv)
    print(json.dumps(bench_gpu(args.out, size=args.size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
