"""``reco demo``: the whole chain on the embedded default, with progress and a final table.

world (+ base CLIP) -> serve over loopback -> embed-memory -> build-index ->
precompute-neighbours -> train -> evaluate (+ neighbour gallery). Each stage is the same library
function its own make target calls, and each is idempotent, so a rerun picks up where it stopped:
on a complete run every stage finds its run record (:mod:`reco.record`) up to date, does no work
and the table is printed again.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from reco import console
from reco.config import RecoConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RecoConfig], Any]
    summary: Callable[[RecoConfig, Any], dict]      # the stage's summary (reco.console.print_summary)


def _world(cfg):
    from reco.world.build import run_world
    return run_world(cfg)


def _embed(cfg):
    from reco.pipelines.embed_memory import embed_splits
    from reco.world.serving import serve_world

    with serve_world(cfg):                  # the world's own port, its server's identity checked
        return embed_splits(cfg)


def _index(cfg):
    from reco.index.build import build_memory_index
    return build_memory_index(cfg)


def _neighbours(cfg):
    from reco.pipelines.neighbours import precompute_neighbours
    return precompute_neighbours(cfg)


def _train(cfg):
    from reco.trainer.train import train
    return train(cfg)


def _evaluate(cfg):
    from reco.evaluation.evaluate import evaluate
    world = cfg.paths.world            # the world's class names and seen/unseen groups are inputs
    return evaluate(cfg, classnames=world / "classnames.txt", groups=world / "species.json")


def up_to_date(name: str, info: Any) -> bool:
    """Whether a stage found its outputs complete and recorded with the same options and inputs
    (their run records, :mod:`reco.record`) and did no work."""
    if not isinstance(info, dict):
        return False
    checks = {
        "world": lambda i: all(i.get(p, {}).get("action") == "kept" for p in ("world", "base_clip")),
        "embed-memory": lambda i: all(s.get("shards_run") == 0 for s in i.values()),
        "precompute-neighbours": lambda i: i.get("computed_shards") == 0,
    }
    return bool(checks.get(name, lambda i: i.get("skipped"))(info))
def _summary(module: str, *, folder: str | None = None) -> Callable[[RecoConfig, Any], dict]:
    """The ``summary`` function of a stage's CLI module (called with the stage's output folder)."""
    def call(cfg: RecoConfig, info: Any) -> dict:
        fn = importlib.import_module(module).summary
        return fn(info, getattr(cfg.paths, folder)) if folder else fn(info)
    return call


STAGES = (
    Stage("world", _world, _summary("reco.world.cli")),
    Stage("embed-memory", _embed, _summary("reco.pipelines.embed_memory")),
    Stage("build-index", _index, _summary("reco.index.cli", folder="index")),
    Stage("precompute-neighbours", _neighbours, _summary("reco.pipelines.neighbours", folder="neighbours")),
    Stage("train", _train, _summary("reco.trainer.cli")),
    Stage("evaluate", _evaluate, _summary("reco.evaluation.cli", folder="eval")),
)


def run_demo(cfg: RecoConfig, *, stages: tuple[Stage, ...] = STAGES) -> dict:
    """Run every stage in order, printing each one's summary (not with -q); returns
    {stage: {"seconds", "info", "up_to_date"}, "total_seconds"}."""
    from reco.config_tree import record

    record(cfg)                     # WORKDIR/config.yaml: every later stage command reads it
    done: dict[str, Any] = {}
    start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        log.info("[%d/%d] %s", i, len(stages), stage.name)
        t0 = time.perf_counter()
        info = stage.run(cfg)
        done[stage.name] = {"seconds": round(time.perf_counter() - t0, 1), "info": info,
                            "up_to_date": up_to_date(stage.name, info)}
        if not console.is_quiet():
            state = " up to date, skipped" if done[stage.name]["up_to_date"] else ""
            console.print_summary(f"[{i}/{len(stages)}] {stage.name}{state} "
                                  f"({console.seconds(done[stage.name]['seconds'])})",
                                  stage.summary(cfg, info), data=info)
    done["total_seconds"] = round(time.perf_counter() - start, 1)
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-stage", default=None, choices=[s.name for s in STAGES],
                        help="skip the stages before this one (their outputs must exist)")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.evaluation.evaluate import RESULTS_FILE, markdown_table
    from reco.validate import read_json

    names = [s.name for s in STAGES]
    first = names.index(args.from_stage) if args.from_stage else 0
    result = run_demo(cfg, stages=STAGES[first:])
    results = read_json(cfg.paths.eval / RESULTS_FILE, {"modes": dict})
    console.print_summary(f"demo ({console.seconds(result['total_seconds'])})", {
        "report": cfg.paths.eval / "report.md", "gallery": cfg.paths.eval / "gallery.html"},
        data={"total_seconds": result["total_seconds"], "results": results})
    if not console.json_summaries():
        print(f"\nzero-shot classification and retrieval (%), {results.get('n_test')} test pairs, "
              f"{results.get('n_classes')} classes:\n")
        print(markdown_table(results["modes"]))
    return 0
