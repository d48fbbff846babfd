"""``reco bench``: every stage's benchmark, results written to a JSON file (never asserted in tests).

Benchmarks live beside their stage (``reco/bench/<stage>.py``), each a function
``bench_<stage>(out_dir, quick, options) -> dict`` registered in :data:`BENCHES`; ``options``
holds the ``--set``/``--model``/``--device``/``--pretrained`` values the bench honours
(``reco.bench.options.HONOURS``; others are refused before any work). A bench that takes
``rounds`` gets ``--rounds`` (paired measurements, :mod:`reco.bench.paired`); the ``claims`` of
every bench's result become the rows of ``summary.md`` beside ``results.json``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import time
from pathlib import Path

from reco.bench.paired import SUMMARY_FILE, summary_markdown
from reco.config import RecoConfig
from reco.errors import ConfigError
from reco.formats import atomic_write_text

BENCHES = {
    "embed": "reco.bench.embed:bench_embed",
    "index": "reco.bench.index:bench_index",
    "train": "reco.bench.train:bench_train",
    "import": "reco.bench.importer:bench_import",
    "react": "reco.bench.react:bench_react",
    "gpu": "reco.bench.gpu:bench_gpu",          # skipped without a CUDA device (make bench-gpu)
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", choices=sorted(BENCHES), help="run only these")
    parser.add_argument("--full", action="store_true", help="full sizes (default: quick sizes)")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and summary.md")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of each paired (A,B,B,A...) measurement (default: 3, --full 10)")


def run_benches(names: list[str], out_dir: Path, quick: bool,
                options: dict[str, dict] | None = None, rounds: int | None = None) -> dict:
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": __import__("os").cpu_count()}, "quick": quick}
    for name in names:
        module, func = BENCHES[name].split(":")
        t0 = time.perf_counter()
        print(f"bench {name} ...", flush=True)
        given = (options or {}).get(name) or {}
        fn = getattr(importlib.import_module(module), func)
        kwargs = {"options": given} if given else {}
        if rounds and "rounds" in inspect.signature(fn).parameters:
            kwargs["rounds"] = rounds
        results[name] = fn(out_dir / name, quick=quick, **kwargs)
        results[name]["options"] = given
        results[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(results[name], indent=2), flush=True)
    return results


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.bench.options import bench_options

    names = args.only or sorted(BENCHES)
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"reco bench: --rounds must be >= 1, got {args.rounds}")
    options = bench_options(names, args, cfg)           # refused before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_benches(names, out, quick=not args.full, options=options, rounds=args.rounds)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / SUMMARY_FILE, summary_markdown(results))
    print(f"results written to {out / 'results.json'}; table: {out / SUMMARY_FILE}")
    print(summary_markdown(results))
    return 0
