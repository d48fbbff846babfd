"""Benchmark of the embed stage: its images/s against the raw open_clip forward, paired.

Per preset (``reco-tiny`` at 32 px, and ``ViT-B-32`` at 224 px, 512-d, random init: no
download), two measurements, each a FRESH process (:mod:`reco.bench.paired`: interleaved
A,B,B,A,..., ``rounds`` rounds, ratio median and spread, load before/after):

* A, ``stage``: :func:`reco.pipelines.embed.embed_rows` on rows holding the resized image bytes
  the download step hands over (img2dataset's resize, ``embed.encode_format``): decode +
  preprocess + tokenise (``embed.decode_workers`` threads) + image and text forward;
* B, ``raw``: ``encode_image`` + ``encode_text`` (:func:`reco.clip.encode_images` /
  :func:`reco.clip.encode_tokens`) on tensors ALREADY decoded, preprocessed and tokenised, same
  model, batch, torch threads, device and precision: the model alone.

Both load the model the same way, run one batch as warm-up, then time one pass over the images.
``ratio = A / B`` (goal >= 0.8 at ViT-B-32/224). The tiny preset also runs the whole job once
(loopback download with img2dataset, embed, write: ``pipeline_images_per_s``).

Run: ``reco bench --only embed`` (``--full``: more images and rounds; ``--rounds N``).
"""
from __future__ import annotations

import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reco.bench.paired import ROUNDS, Claim, paired
from reco.formats import STATUS_OK, atomic_write_text

# preset -> model, source image side (px), images (quick, full), batch, ratio goal
PRESETS = {
    "reco-tiny": dict(model="reco-tiny", source_px=64, images=(2048, 8192), batch=256, goal=None),
    "ViT-B-32": dict(model="ViT-B-32", source_px=256, images=(64, 256), batch=32, goal=0.8),
}
COMMAND = "reco bench --only embed"


# --------------------------------------------------------------------------------------------
# the measured processes (``python -m reco.bench.embed stage|raw SPEC``)
# --------------------------------------------------------------------------------------------

def _load(spec_path: str):
    """(spec, clip, rows) in a child: the model loaded as the parent said, the rows read back."""
    import pyarrow.parquet as pq
    import torch

    from reco.clip import load_clip, resolve_device
    from reco.pipelines.download import IMAGE_KEY

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    clip = load_clip(spec["model"], spec["pretrained"], device=resolve_device(spec["device"]),
                     precision=spec["precision"])
    table = pq.read_table(Path(spec_path).parent / "rows.parquet").to_pylist()
    rows = [{"id": r["id"], "url": "", "caption": r["caption"], "label": None, "status": STATUS_OK,
             "error_message": None, IMAGE_KEY: r["image"]} for r in table]
    return spec, clip, rows


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(n: int, fn) -> dict:
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"rate": n / seconds, "seconds": round(seconds, 3), "cpu_seconds": round(_cpu() - c0, 3),
            "images": n}


def measure_stage(spec_path: str) -> dict:
    """A: embed_rows on the rows (after one warm-up batch)."""
    from reco.pipelines.embed import embed_rows

    spec, clip, rows = _load(spec_path)
    batch, workers = spec["batch"], spec["decode_workers"]
    embed_rows(clip, rows[:batch], batch, workers)                     # warm-up
    done = {}
    result = _timed(len(rows), lambda: done.update(out=embed_rows(clip, rows, batch, workers)))
    ok = sum("image_emb" in r for r in done["out"])
    if ok != len(rows):
        raise RuntimeError(f"embed_rows embedded {ok} of {len(rows)} rows")
    return {**result, "decode_workers": workers}


def measure_raw(spec_path: str) -> dict:
    """B: the model's image + text forward on decoded, preprocessed, tokenised batches. They are
    decoded and tokenised (untimed) by the stage's own executors, kept alive while the forward is
    timed, so that the process holds the same threads as A's: libgomp throttles its spin-waiting
    while more threads than cores use OpenMP, and without them the same forward cost ~35% more
    CPU on the loaded 2-core machine (raw slower than the whole stage)."""
    import torch

    from reco.clip import encode_images, encode_tokens
    from reco.pipelines.download import IMAGE_KEY
    from reco.pipelines.embed import _executors, decode

    spec, clip, rows = _load(spec_path)
    batch = spec["batch"]

    def forward(todo):
        for pixels, tokens in todo:
            encode_images(clip, pixels)
            encode_tokens(clip, tokens)

    with _executors(spec["decode_workers"]) as (decoder, tokeniser):     # alive while timed, as in A
        pixels = [decoder.submit(decode, clip, r[IMAGE_KEY]) for r in rows]
        batches = [(torch.stack([f.result() for f in pixels[s:s + batch]]),
                    tokeniser.submit(clip.tokenizer, [r["caption"] for r in rows[s:s + batch]]).result())
                   for s in range(0, len(rows), batch)]
        forward(batches[:1])                                            # warm-up
        return _timed(len(rows), lambda: forward(batches))


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def _resized_rows(image_size: int, n: int, source_px: int, encode_format: str) -> list[dict]:
    """n random images of ``source_px`` px, resized as the download step resizes them."""
    from PIL import Image

    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.download import resizer

    resize = resizer(image_size, EmbedConfig(encode_format=encode_format))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (source_px, source_px, 3), dtype=np.uint8)).save(buf, format="PNG")
        data, *_, err = resize(io.BytesIO(buf.getvalue()), None)
        if err is not None:
            raise RuntimeError(f"resize failed: {err}")
        rows.append({"id": i, "caption": f"a photo of object number {i}", "image": data})
    return rows


def spec_of(model: str, pretrained: str | None, n: int, batch: int, opt: dict) -> dict:
    """What both children run with: the model and the run options (given, else the defaults)."""
    from reco.pipelines.config import EmbedConfig

    defaults = EmbedConfig()
    return {"model": model, "pretrained": pretrained, "images": n, "batch": batch,
            "encode_format": opt.get("embed.encode_format", defaults.encode_format),
            "threads": opt.get("embed.torch_threads", defaults.torch_threads),
            "decode_workers": opt.get("embed.decode_workers", defaults.decode_workers),
            "device": opt.get("clip.device", "cpu"), "precision": opt.get("clip.precision", "fp32")}


def prepare(work: Path, model: str, pretrained: str | None, n: int, batch: int, source_px: int,
            opt: dict) -> Path:
    """The work folder of one preset: rows.parquet and spec.json (what both children read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from reco.clip import encode_texts, load_clip, save_local_dir

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = load_clip(model, pretrained)
    spec = spec_of(model, pretrained, n, batch, opt)
    if model == "reco-tiny":                       # a saved random model, as the tests' workers load it
        spec["model"] = save_local_dir(clip.model, "reco-tiny", work / "clip")
    rows = _resized_rows(clip.image_size, n, source_px, spec["encode_format"])
    pq.write_table(pa.Table.from_pylist(rows), work / "rows.parquet")
    spec.update(image_size=clip.image_size, embed_dim=int(encode_texts(clip, ["x"]).shape[1]))
    atomic_write_text(work / "spec.json", json.dumps(spec, indent=2))
    return work / "spec.json"


def bench_preset(name: str, preset: dict, work: Path, quick: bool, rounds: int, opt: dict) -> dict:
    n = preset["images"][0 if quick else 1]
    batch = opt.get("embed.batch_size", preset["batch"])
    spec_path = prepare(work, preset["model"], preset.get("pretrained"), n, batch, preset["source_px"], opt)
    spec = json.loads(spec_path.read_text())
    print(f"embed {name}: {n} images of {spec['image_size']} px, batch {batch}, {rounds} rounds", flush=True)
    stats = paired(["-m", "reco.bench.embed", "stage", str(spec_path)],
                   ["-m", "reco.bench.embed", "raw", str(spec_path)], rounds)
    claim = Claim.from_paired(f"embed stage / raw forward, {name} {spec['image_size']} px, batch {batch}, "
                              f"{spec['threads']} torch threads, {spec['decode_workers']} decode workers",
                              stats, preset["goal"], "img/s", "stage", "raw", COMMAND)
    return {"preset": name, **spec, "paired": stats, "claim": claim.as_dict()}


def bench_embed(out_dir: str | Path, quick: bool = True, options: dict | None = None,
                rounds: int | None = None) -> dict:
    """Run the benchmark, write ``embed.json`` into ``out_dir`` and return the results (with
    ``claims``: rows of ``summary.md``).

    ``options`` (``reco bench --only embed --model ... --device ... --set ...``): ``clip.model``
    (+ ``clip.pretrained``) benchmarks that model instead of the two presets (ViT-B-32's sizes);
    ``clip.device``, ``clip.precision``, ``embed.batch_size``, ``embed.torch_threads``,
    ``embed.decode_workers`` and ``embed.encode_format`` apply to every model.
    """
    out_dir, opt = Path(out_dir), options or {}
    rounds = rounds or ROUNDS["quick" if quick else "full"]
    presets = dict(PRESETS)
    if "clip.model" in opt:
        presets = {opt["clip.model"]: {**PRESETS["ViT-B-32"], "model": opt["clip.model"],
                                       "pretrained": opt.get("clip.pretrained")}}
    results = {"quick": quick, "rounds": rounds, "models": []}
    with tempfile.TemporaryDirectory(prefix="reco-bench-embed-") as tmp:
        for name, preset in presets.items():
            work = Path(tmp) / name.replace("/", "_")
            results["models"].append(bench_preset(name, preset, work, quick, rounds, opt))
            if name == "reco-tiny":
                results["models"][-1]["pipeline_images_per_s"] = round(_pipeline_rate(work, opt), 1)
    results["claims"] = [m["claim"] for m in results["models"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "embed.json", json.dumps(results, indent=2))
    return results


def _pipeline_rate(work: Path, opt: dict) -> float:
    """The whole embed job once (img2dataset over loopback HTTP, embed, write) on the preset's
    rows served as files: images/s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import embed_urls
    from reco.world.server import WorldServer

    spec = json.loads((work / "spec.json").read_text())
    rows = pq.read_table(work / "rows.parquet").to_pylist()
    (work / "images").mkdir(exist_ok=True)
    for r in rows:
        (work / "images" / f"{r['id']}.png").write_bytes(r["image"])
    with WorldServer(work / "images") as server:
        urls = [f"{server.base_url}{r['id']}.png" for r in rows]
        pq.write_table(pa.table({"url": urls, "caption": [r["caption"] for r in rows]}), work / "urls.parquet")
        cfg = EmbedConfig(shard_size=max(1, len(rows) // 2), batch_size=spec["batch"],
                          allow_networks=("127.0.0.0/8",), torch_threads=spec["threads"],
                          decode_workers=spec["decode_workers"], threads=16, device=spec["device"],
                          precision=spec["precision"], encode_format=spec["encode_format"])
        start = time.perf_counter()
        _, info = embed_urls(str(work / "urls.parquet"), str(work / "out"), model=spec["model"],
                             pretrained=spec["pretrained"], embed_cfg=cfg)
        seconds = time.perf_counter() - start
    if info["counts"][STATUS_OK] != len(rows):
        raise RuntimeError(f"pipeline embedded {info['counts']}")
    return len(rows) / seconds


if __name__ == "__main__":               # the measured processes
    import logging

    logging.disable(logging.WARNING)
    what, spec_file = sys.argv[1], sys.argv[2]
    print(json.dumps((measure_stage if what == "stage" else measure_raw)(spec_file)))
