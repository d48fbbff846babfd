"""Peak RSS of ``reco embed-memory`` on a hostile URL list served on loopback.

The list mixes good images with bytes-per-pixel bombs (7999 x 7999 16-bit RGBA, 498 KB each),
pixel bombs (30000 x 30000), trickled headers, trickled bodies, endless bodies, bodies shorter
than their Content-Length, oversized bodies and dead links. ``reco embed-memory`` (the real CLI,
DirectRunner, img2dataset, a random reco-tiny CLIP) runs in a child process; its peak RSS is
that child's ``ru_maxrss``.

    .venv/bin/python -m tests.attacks.hostile_embed_rss [--good 200] [--each 16] [--threads 16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ("bpp-bomb/h{i}.png", "bomb/h{i}.png", "trickle-headers/h{i}.png?s=8",
           "trickle-body/h{i}.png?s=8", "endless/h{i}.png?s=8", "short/h{i}.png", "404/h{i}.png",
           "huge/h{i}.png?mb=40")


# runs the command as its only child and reports that child's peak RSS
_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(rc)")


def hostile_list(base: str, good: list[str], each: int) -> list[str]:
    urls = [f"{base}good/{name}" for name in good]
    for i in range(each):
        urls += [f"{base}_hostile/{kind.format(i=i)}" for kind in HOSTILE]
    urls += [f"http://127.0.0.1:1/dead{i}.png" for i in range(each)]
    return urls


def measure(n_good: int = 200, each: int = 16, threads: int = 16, timeout: int = 3) -> dict:
    """Serve a hostile list, run ``reco embed-memory`` on it, return its peak RSS and counts."""
    import torch

    from reco.clip import load_clip, save_local_dir
    from reco.world.bombs import bpp_bomb, pixel_bomb
    from reco.world.server import WorldServer
    from tests.fixtures.embed import make_images

    work = Path(tempfile.mkdtemp(prefix="reco-hostile-rss-"))
    names = make_images(work / "served" / "good", n_good, size=(96, 80))
    torch.manual_seed(0)
    model = save_local_dir(load_clip("reco-tiny").model, "reco-tiny", work / "clip")
    bpp_bomb(), pixel_bomb()
    with WorldServer(work / "served") as server:
        urls = hostile_list(server.base_url, names, each)
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}),
                       work / "urls.parquet")
        cmd = [str(Path(sys.executable).with_name("reco")), "embed-memory", "--preset", "tiny",
               "--workdir", str(work / "run"), "--model", model, "--input", str(work / "urls.parquet"),
               "--output", str(work / "out"), "--set", "embed.allow_networks=127.0.0.0/8",
               "--set", f"embed.timeout={timeout}", "--set", f"embed.threads={threads}",
               "--set", "embed.shard_size=1000", "--set", "embed.torch_threads=1"]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], cwd=REPO, capture_output=True,
                              text=True, timeout=1200, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        seconds = time.monotonic() - start
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    peak_mb = int(peak[-1].split()[1]) / 1024 if peak else float("nan")
    if proc.returncode != 0:
        raise RuntimeError(f"reco embed-memory failed ({proc.returncode}): {proc.stderr[-3000:]}")
    counts = json.loads((work / "out" / "manifest.json").read_text())["counts"]
    return {"rows": len(urls), "good": n_good, "hostile": len(urls) - n_good, "threads": threads,
            "timeout": timeout, "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1),
            "counts": counts, "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--good", type=int, default=200)
    parser.add_argument("--each", type=int, default=16, help="rows of each hostile kind")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.good, args.each, args.threads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
