"""Run :func:`reco.pipelines.download.fetch_shard` on a list of URLs in THIS process and print
its peak RSS as JSON; a watchdog ends the process (exit 3) if RSS passes ``--limit-mb``, so a
memory bomb that gets through cannot take the machine with it.

    python -m tests.attacks.rss_probe --limit-mb 3000 --threads 8 --warm 8 URL [URL ...]

The first ``--warm`` URLs (good images) are fetched first; ``warm_mb`` is the peak after them,
``peak_mb`` the peak after the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def watchdog(limit_mb: float) -> None:
    def run():
        while True:
            now = rss_mb()
            if now > limit_mb:
                print(json.dumps({"killed_at_mb": round(now)}), flush=True)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=run, daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-mb", type=float, default=1000,
                        help="most RSS growth over the warm-up's peak before the watchdog ends it")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=5)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from reco.pipelines.config import LOOPBACK, EmbedConfig
    from reco.pipelines.download import fetch_shard

    cfg = EmbedConfig(threads=args.threads, timeout=args.timeout, allow_networks=LOOPBACK)
    rows = [{"id": i, "url": u, "caption": "c", "label": None, "status": None, "error_message": None}
            for i, u in enumerate(args.urls)]
    fetch_shard(rows[:args.warm], 32, cfg)            # warm up: imports, good images
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    watchdog(before + args.limit_mb)
    out = fetch_shard(rows[args.warm:], 32, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"warm_mb": round(before), "peak_mb": round(peak),
                      "rows": [[r["status"], r["error_message"]] for r in out]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
