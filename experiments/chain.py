"""One world seed's chain for an experiment: world + base CLIP (cached across runs under
``$RECO_TEST_CACHE``), embedded splits, memory index and neighbour tensors, all idempotent."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

from reco import config as config_lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_config(preset: str, seed: int, workdir: str | Path, overrides: list[str] = ()):
    """The preset for world seed ``seed`` in ``workdir`` on a free loopback port."""
    cfg = config_lib.override(config_lib.preset(preset, workdir=str(workdir)), list(overrides))
    world = dataclasses.replace(cfg.world, seed=seed, port=free_port())
    cfg = dataclasses.replace(cfg, world=world)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # a busy machine: one torch thread trains the base CLIP faster (same weights either way)
        cfg = dataclasses.replace(cfg, base_clip=dataclasses.replace(cfg.base_clip, threads=1))
    return cfg


def prepare(cfg, *, use_cache: bool = True) -> dict[str, float]:
    """World + base CLIP (cached), embed, index, neighbours; returns seconds per stage."""
    from reco.index.build import build_memory_index
    from reco.pipelines.embed_memory import embed_splits
    from reco.pipelines.neighbours import precompute_neighbours
    from reco.world.cache import make_world

    seconds = {}
    stages = (("world", lambda c: make_world(c, use_cache=use_cache)), ("embed", embed_splits),
              ("index", build_memory_index), ("neighbours", precompute_neighbours))
    for name, fn in stages:
        t0 = time.perf_counter()
        fn(cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return seconds
