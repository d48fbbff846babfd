"""Benchmark of the embed stage: its images/s against raw open_clip forward images/s.

Same model, same batch size, same machine, one process:

* ``raw_forward``: ``encode_image`` + ``encode_text`` on tensors already preprocessed (the
  model alone; ``raw_image_forward`` is ``encode_image`` only);
* ``decode_preprocess``: PIL decode + the model's eval transform of the resized image bytes;
* ``embed_stage``: :func:`reco.pipelines.embed.embed_rows` on rows holding image bytes (what the
  Beam step does per shard: decode, preprocess, batch, encode images and captions);
* ``pipeline``: the whole job (loopback download with img2dataset, embed, write) through
  :func:`reco.pipelines.embed_memory.embed_urls` on the DirectRunner.

``ratio = embed_stage / raw_forward`` (goal >= 0.8). For a tiny model the forward is so cheap that
decode/preprocess dominates; ``full`` mode adds a ViT-B-32 (random init, no download).
"""
from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reco.clip import encode_images, encode_texts, load_clip, save_local_dir
from reco.formats import STATUS_OK, atomic_write_text


def _png_corpus(folder: Path, n: int, size: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


def _rate(n: int, fn, repeat: int = 2) -> float:
    fn()                                                     # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def _resized_rows(clip, files: list[Path], captions: list[str]) -> list[dict]:
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.download import IMAGE_KEY, resizer

    resize = resizer(clip.image_size, EmbedConfig())
    rows = []
    for i, (path, caption) in enumerate(zip(files, captions)):
        data, *_, err = resize(io.BytesIO(path.read_bytes()), None)
        assert err is None, err
        rows.append({"id": i, "url": "", "caption": caption, "label": None, "status": STATUS_OK,
                     "error_message": None, IMAGE_KEY: data})
    return rows


def bench_model(model: str, pretrained: str | None, n: int, batch: int, threads: int,
                image_px: int, work: Path, device: str = "cpu", precision: str = "fp32") -> dict:
    from reco.clip import resolve_device
    from reco.pipelines.download import IMAGE_KEY
    from reco.pipelines.embed import decode, embed_rows

    torch.set_num_threads(threads)
    device = resolve_device(device)
    clip = load_clip(model, pretrained, device=device, precision=precision)
    names = _png_corpus(work / "images", n, image_px)
    captions = [f"a photo of object number {i}" for i in range(n)]
    rows = _resized_rows(clip, [work / "images" / f for f in names], captions)
    pixels = torch.stack([decode(clip, r[IMAGE_KEY]) for r in rows])

    def forward(with_text: bool):
        for s in range(0, n, batch):
            encode_images(clip, pixels[s:s + batch])
            if with_text:
                encode_texts(clip, captions[s:s + batch])

    out = {"model": model, "device": device, "precision": precision, "images": n, "batch": batch,
           "torch_threads": threads,
           "raw_image_forward": _rate(n, lambda: forward(False)),
           "raw_forward": _rate(n, lambda: forward(True)),
           "decode_preprocess": _rate(n, lambda: [decode(clip, r[IMAGE_KEY]) for r in rows]),
           "embed_stage": _rate(n, lambda: embed_rows(clip, rows, batch))}
    out["ratio"] = out["embed_stage"] / out["raw_forward"]
    out["ratio_vs_image_forward"] = out["embed_stage"] / out["raw_image_forward"]
    out["pipeline"] = _pipeline_rate(clip, model, pretrained, names, captions, batch, threads, work,
                                     device=device, precision=precision)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _pipeline_rate(clip, model, pretrained, names, captions, batch, threads, work: Path,
                   device: str = "cpu", precision: str = "fp32") -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import embed_urls
    from reco.world.server import WorldServer

    with WorldServer(work / "images") as server:
        urls = [server.base_url + name for name in names]
        pq.write_table(pa.table({"url": urls, "caption": captions}), work / "urls.parquet")
        cfg = EmbedConfig(shard_size=max(1, len(names) // 2), batch_size=batch, allow_networks=("127.0.0.0/8",),
                          torch_threads=threads, threads=16, device=device, precision=precision)
        start = time.perf_counter()
        _, info = embed_urls(str(work / "urls.parquet"), str(work / f"out-{time.time_ns()}"),
                             model=model, pretrained=pretrained, embed_cfg=cfg)
        seconds = time.perf_counter() - start
    assert info["counts"][STATUS_OK] == len(names), info["counts"]
    return len(names) / seconds


def bench_embed(out_dir: str | Path, quick: bool = True, options: dict | None = None) -> dict:
    """Run the benchmark, write ``embed.json`` into ``out_dir`` and return the results.

    ``options`` (``reco bench --only embed --model ... --device ... --set ...``): ``clip.model``
    (+ ``clip.pretrained``) benchmarks that model instead of reco-tiny; ``clip.device``,
    ``clip.precision``, ``embed.batch_size`` and ``embed.torch_threads`` apply to every model.
    """
    out_dir, opt = Path(out_dir), options or {}
    n, batch = (512, 256) if quick else (2048, 256)
    batch, threads = opt.get("embed.batch_size", batch), opt.get("embed.torch_threads", 2)
    run = dict(device=opt.get("clip.device", "cpu"), precision=opt.get("clip.precision", "fp32"))
    results = {"quick": quick, "note": "noisy shared machine; images/s, best of 2 after warm-up",
               "models": []}
    with tempfile.TemporaryDirectory(prefix="reco-bench-embed-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        if "clip.model" in opt:
            results["models"].append(bench_model(opt["clip.model"], opt.get("clip.pretrained"), n // 4,
                                                 batch, threads, 256, work / "model", **run))
        else:
            spec = save_local_dir(load_clip("reco-tiny").model, "reco-tiny", work / "reco-tiny")
            results["models"].append(bench_model(spec, None, n, batch, threads, 64, work / "tiny", **run))
        if not quick and "clip.model" not in opt:
            results["models"].append(bench_model("ViT-B-32", None, n // 8, min(batch, 64), threads, 256,
                                                 work / "b32", **run))
    atomic_write_text(out_dir / "embed.json", json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_embed(sys.argv[1] if len(sys.argv) > 1 else "runs/bench",
                                 quick="--full" not in sys.argv), indent=2))
