"""``reco demo``: the whole chain on the embedded default, with progress and a final table.

world (+ base CLIP) -> serve over loopback -> embed-memory -> build-index ->
precompute-neighbours -> train -> evaluate (+ neighbour gallery). Each stage is the same library
function its own make target calls, and each is idempotent, so a rerun picks up where it stopped.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable

from reco.config import RecoConfig


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RecoConfig], Any]


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


STAGES = (
    Stage("world", _world),
    Stage("embed-memory", _embed),
    Stage("build-index", _index),
    Stage("precompute-neighbours", _neighbours),
    Stage("train", _train),
    Stage("evaluate", _evaluate),
)


def run_demo(cfg: RecoConfig, *, stages: tuple[Stage, ...] = STAGES, echo: Callable[[str], None] = print) -> dict:
    """Run every stage in order; returns {stage: (seconds, info)}."""
    cfg.paths.root.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.paths.root / "config.json")
    done: dict[str, Any] = {}
    start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        echo(f"[{i}/{len(stages)}] {stage.name} ...")
        t0 = time.perf_counter()
        info = stage.run(cfg)
        seconds = time.perf_counter() - t0
        done[stage.name] = {"seconds": round(seconds, 1), "info": info}
        echo(f"[{i}/{len(stages)}] {stage.name} done in {seconds:.1f}s")
    done["total_seconds"] = round(time.perf_counter() - start, 1)
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-stage", default=None, choices=[s.name for s in STAGES],
                        help="skip the stages before this one (their outputs must exist)")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    names = [s.name for s in STAGES]
    first = names.index(args.from_stage) if args.from_stage else 0
    result = run_demo(cfg, stages=STAGES[first:])
    report = cfg.paths.eval / "report.md"
    print()
    if report.is_file():
        print(report.read_text())
    print(f"total: {result['total_seconds']:.0f}s")
    print(f"report:  {report}")
    print(f"gallery: {cfg.paths.eval / 'gallery.html'}")
    return 0
