"""One world seed's chain for an experiment: world + base CLIP (cached across runs under
``$RECO_TEST_CACHE``), embedded splits, memory index and neighbour tensors, all idempotent.
The stages are the demo's and the CLI's (:data:`reco.demo.STAGES`), up to the neighbours."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

from reco import config as config_lib
from reco.demo import STAGES

# the stages before training; an experiment trains its own heads
CHAIN = ("world", "embed-memory", "build-index", "precompute-neighbours")
ALL_FIELDS = ("v_img_txt", "t_txt_img", "v_img_img", "t_txt_txt",
              "v_txt_txt", "t_img_img", "v_txt_img", "t_img_txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_seed(cfg, seed: int, workdir: str | Path, **world):
    """``cfg`` for world seed ``seed`` in ``workdir`` on a free loopback port (``world``: other
    world options, e.g. ``noise``)."""
    return dataclasses.replace(cfg, workdir=str(workdir),
                               world=dataclasses.replace(cfg.world, seed=seed, port=free_port(), **world))


def seed_config(preset: str, seed: int, workdir: str | Path, overrides: list[str] = ()):
    """The preset for world seed ``seed`` in ``workdir`` on a free loopback port."""
    cfg = with_seed(config_lib.override(config_lib.preset(preset), list(overrides)), seed, workdir)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # a busy machine: one torch thread trains the base CLIP faster (same weights either way)
        cfg = dataclasses.replace(cfg, base_clip=dataclasses.replace(cfg.base_clip, threads=1))
    return cfg


def chain_config(base, seed: int, workdir: str | Path, *, noise: float | None = None):
    """``base`` (a RecoConfig) for world seed ``seed`` in ``workdir``: a free loopback port and
    neighbour tensors with all eight context fields (what every ablation variant trains on)."""
    cfg = with_seed(base, seed, workdir, **({} if noise is None else {"noise": noise}))
    return dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, fields=ALL_FIELDS))


def prepare(cfg, *, use_cache: bool = True) -> dict[str, float]:
    """World + base CLIP (cached), embed, index, neighbours; returns seconds per stage."""
    from reco.world.cache import make_world

    seconds = {}
    for stage in (s for s in STAGES if s.name in CHAIN):
        run = (lambda c: make_world(c, use_cache=use_cache)) if stage.name == "world" else stage.run
        t0 = time.perf_counter()
        run(cfg)
        seconds[stage.name] = round(time.perf_counter() - t0, 1)
    return seconds


def link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (a side work directory sharing a run's folders), unless present."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() or link.exists()):
        os.symlink(Path(target).resolve(), link, target_is_directory=Path(target).is_dir())
