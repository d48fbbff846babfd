"""Benchmark of the trainer's data path: streaming from Parquet shards vs. tensors held in memory.

``bench_train(out_dir, quick)`` writes synthetic trainer tensors (``reco.formats.tensors_schema``),
then times the same training step fed (a) by :class:`reco.trainer.data.TensorStream` through a
DataLoader (0 and 1 worker) and (b) by batches sliced from arrays already in memory. It also
measures the peak resident memory of a streaming run and of an in-memory load at 1x and 10x
the data (each in a fresh subprocess). Goal: streaming >= 0.9x in-memory samples/s, and flat
streaming memory as the data grows.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _write(folder: Path, n: int, dim: int, k: int, plain: bool = True) -> None:
    import pyarrow as pa

    from reco.formats import Manifest, atomic_write_table, encode_block, tensors_schema

    fields = ("v_img_txt", "t_txt_img")
    schema, rng, shards, per = tensors_schema(dim, k, fields), np.random.default_rng(0), [], 10000
    for i, lo in enumerate(range(0, n, per)):
        m = min(per, n - lo)
        unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(  # noqa: E731
            rng.standard_normal((*s, dim)).astype(np.float32))
        cols = [pa.array(np.arange(lo, lo + m), pa.int64()), encode_block(unit(m), dim), encode_block(unit(m), dim)]
        cols += [encode_block(unit(m, k), dim, k) for _ in fields]
        shards.append(f"part-{i:05d}.parquet")
        enc = {"use_dictionary": False, "compression": "none"} if plain else {}
        atomic_write_table(pa.Table.from_arrays(cols, schema=schema), folder / shards[-1],
                           row_group_size=2048, **enc)
    Manifest("tensors", shards, {"rows": n}, {"dim": dim, "k": k, "fields": list(fields)}).write(folder)


def _setup(folder: Path, batch: int, workers: int, device: str = "cpu"):
    import torch

    from reco.trainer.config import HeadConfig, TrainConfig
    from reco.trainer.data import TensorStream
    from reco.trainer.tensors import read_tensors_info
    from reco.trainer.train import build_optimizer, build_train_model

    info = read_tensors_info(folder, need=("v_img_txt", "t_txt_img"))
    tc = TrainConfig(batch_size=batch, k=info.k, num_workers=workers, head=HeadConfig())
    torch.manual_seed(0)
    model = build_train_model(tc, info.dim).to(device)
    stream = TensorStream(info, fields=("v_img_txt", "t_txt_img"), k=info.k, batch_size=batch,
                          shuffle_buffer=tc.shuffle_buffer, num_workers=workers)
    return info, model, build_optimizer(model, tc), stream


def _load_all(info) -> dict[str, np.ndarray]:
    from reco.trainer.data import TensorStream

    everything = TensorStream(info, fields=("v_img_txt", "t_txt_img"), k=info.k, batch_size=info.rows,
                              shuffle_buffer=0, epochs=1)
    return {key: value.numpy() for key, value in next(iter(everything)).items()}


def _time_steps(model, optimizer, batches, steps: int, warmup: int = 3, device: str = "cpu") -> float:
    """Seconds of ``steps`` training steps (each ends with the loss read back: synchronised)."""
    import torch

    from reco.trainer.train import train_step

    where = torch.device(device)
    for _ in range(warmup):
        train_step(model, optimizer, next(batches), lr=1e-4, device=where)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, next(batches), lr=1e-4, device=where)
    return time.perf_counter() - t0


def _in_memory_batches(arrays, batch: int):
    import torch

    rng, n = np.random.default_rng(0), len(arrays["id"])
    while True:                                     # shuffled each epoch, like the stream
        perm = rng.permutation(n)
        for lo in range(0, n - batch + 1, batch):
            idx = perm[lo:lo + batch]
            yield {key: torch.from_numpy(a[idx]) for key, a in arrays.items()}


def throughput(folder: Path, *, batch: int, steps: int, workers: int, device: str = "cpu") -> dict:
    from reco.trainer.data import make_loader

    info, model, optimizer, stream = _setup(folder, batch, workers, device)
    loader = make_loader(stream, pin_memory=device.startswith("cuda"))
    stream_s = _time_steps(model, optimizer, iter(loader), steps, device=device)
    arrays = _load_all(info)
    memory_s = _time_steps(model, optimizer, _in_memory_batches(arrays, batch), steps, device=device)
    return {"workers": workers, "device": device, "steps_per_s": steps / memory_s,
            "streaming_steps_per_s": steps / stream_s, "streaming_samples_per_s": steps * batch / stream_s,
            "in_memory_samples_per_s": steps * batch / memory_s, "ratio": memory_s / stream_s}


def read_rate(folder: Path, *, batch: int, epochs: int = 2) -> float:
    """Samples/s of the data path alone (main process, shuffle buffer fill included), over
    ``epochs`` passes so that the rate is not just the buffer draining."""
    from reco.trainer.data import make_loader

    info, _, _, stream = _setup(folder, batch, 0)
    it, count = iter(make_loader(stream)), epochs * info.rows // batch
    t0 = time.perf_counter()
    for _ in range(count):
        next(it)
    return count * batch / (time.perf_counter() - t0)


def _status_mib(key: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB: ``VmRSS`` (resident
    now), ``VmHWM`` (peak resident); NaN when the kernel does not report it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_probe(folder: str, mode: str, batch: int, steps: int) -> None:
    """In a subprocess: peak RSS (MiB) while streaming ``steps`` batches or loading everything and
    training on it, measured from after the imports/model set-up (peak counter reset there)."""
    import torch

    from reco.trainer.data import make_loader

    torch.set_num_threads(1)
    info, model, optimizer, stream = _setup(Path(folder), batch, 0)
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")        # reset VmHWM (Linux)
    if mode == "stream":
        _time_steps(model, optimizer, iter(make_loader(stream)), steps, warmup=0)
    else:
        _time_steps(model, optimizer, _in_memory_batches(_load_all(info), batch), steps, warmup=0)
    print(json.dumps({"base_mib": base, "peak_mib": _status_mib("VmHWM")}))


def _peak(folder: Path, mode: str, batch: int, steps: int) -> dict:
    code = f"from reco.bench.train import _peak_probe; _peak_probe({str(folder)!r}, {mode!r}, {batch}, {steps})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return {"peak_mib": round(got["peak_mib"], 1), "above_setup_mib": round(got["peak_mib"] - got["base_mib"], 1)}


def bench_train(out_dir: str | Path, quick: bool = True, options: dict | None = None) -> dict:
    """Streaming vs in-memory samples/s for the same step, and peak memory at 1x / 10x data.

    Args:
        out_dir: scratch folder for the synthetic shards; ``bench_train.json`` is written there.
        quick: small dims/rows (dim 128, 8k rows) instead of CLIP-B-like (dim 512, 40k rows).
        options: ``train.batch_size`` (the step's batch) and ``train.num_workers`` (the streaming
            loader's workers; default: 0 and 1 compared), from ``reco bench --set``.
    Timings use one torch thread (the machine is shared); memory is measured in subprocesses.
    """
    import torch

    from reco.formats import atomic_write_text

    out = Path(out_dir)
    dim, k, rows, batch, steps = (128, 10, 8192, 256, 20) if quick else (512, 10, 40000, 512, 40)
    batch = (options or {}).get("train.batch_size", batch)
    workers = [options["train.num_workers"]] if "train.num_workers" in (options or {}) else [0, 1]
    for name, scale, plain in (("plain-x1", 1, True), ("plain-x10", 10, True), ("default-x1", 1, False)):
        if not (out / name / "manifest.json").exists():
            _write(out / name, rows * scale, dim, k, plain=plain)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {"dim": dim, "k": k, "rows_1x": rows, "batch": batch, "steps": steps, "torch_threads": 1,
                  "read_samples_per_s": {enc: read_rate(out / f"{enc}-x1", batch=batch)
                                         for enc in ("plain", "default")},
                  "throughput": [throughput(out / "plain-x1", batch=batch, steps=steps, workers=w) for w in workers]}
    finally:
        torch.set_num_threads(threads)
    result["peak_rss"] = {f"{mode}_x{scale}": _peak(out / f"plain-x{scale}", mode, batch, steps)
                          for mode in ("stream", "in_memory") for scale in (1, 10)}
    result["shard_mib_x1"] = sum(p.stat().st_size for p in (out / "plain-x1").glob("*.parquet")) / 2**20
    result["goal_ratio_0.9_met"] = max(t["ratio"] for t in result["throughput"]) >= 0.9
    atomic_write_text(out / "bench_train.json", json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(bench_train(sys.argv[1] if len(sys.argv) > 1 else "runs/bench/train",
                                 quick="--full" not in sys.argv), indent=2))
