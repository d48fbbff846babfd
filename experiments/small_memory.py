"""A subsampled memory for the "larger memory at inference than at training" ablation (Fig. 3).

A side work directory gets a random ``fraction`` of the embedded memory rows; the other inputs
(world, train/test embeddings) are linked from the main work directory. The memory index and the
neighbour tensors are then built there by the ordinary stage functions
(:func:`reco.index.build.build_memory_index`, :func:`reco.pipelines.neighbours.precompute_neighbours`)
so heads trained on them differ from the main ones only by the memory they saw.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from experiments.chain import link
from reco.errors import ConfigError
from reco.embedded import read_table
from reco.formats import Manifest, atomic_write_table, atomic_write_text

log = logging.getLogger(__name__)
DONE = "small_memory.json"


def subsample_embedded(src: str | Path, dst: str | Path, fraction: float, seed: int = 0) -> dict[str, Any]:
    """Copy a random ``fraction`` of the rows of the embedded shards in ``src`` to ``dst``
    (same shard names, same schema, new manifest). Returns counts."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"small_memory_fraction={fraction} (--small-memory-fraction): must be in (0, 1]")
    manifest = Manifest.read(src, kind="embedded")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 31]))
    counts, kept, total = Counter(), 0, 0
    for name, path in zip(manifest.shards, manifest.shard_paths(src)):
        table = read_table(path)
        keep = rng.random(table.num_rows) < fraction
        part = table.filter(keep)
        atomic_write_table(part, Path(dst) / name)
        counts.update(part["status"].to_pylist())
        kept, total = kept + part.num_rows, total + table.num_rows
    info = {**manifest.info, "rows": kept, "subsampled_from": str(src), "fraction": fraction}
    Manifest(kind="embedded", shards=list(manifest.shards), counts=dict(counts), info=info).write(dst)
    return {"rows": kept, "of": total, "ok": int(counts.get("success", 0))}



def prepare_small_memory(cfg, fraction: float, workdir: str | Path, *, seed: int | None = None
                         ) -> tuple[Any, dict[str, Any]]:
    """A side work directory with a subsampled memory, its index and its neighbour tensors.

    Returns (the RecoConfig of that directory, info). Reused when already prepared with the same
    fraction, seed and source memory.
    """
    from reco.clip import resolve_model_spec

    workdir = Path(workdir)
    seed = cfg.seed if seed is None else seed
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    train = cfg.train
    fields = tuple(dict.fromkeys(f for f, on in ((train.image_context, train.fuse_image),
                                                 (train.text_context, train.fuse_text)) if on))
    small = dataclasses.replace(
        cfg, workdir=str(workdir), clip=dataclasses.replace(cfg.clip, model=model, pretrained=pretrained),
        neighbours=dataclasses.replace(cfg.neighbours, fields=fields))
    src = Manifest.read(cfg.paths.embedded("memory"), kind="embedded")
    key = {"fraction": fraction, "seed": seed, "source": str(Path(cfg.paths.embedded("memory")).resolve()),
           "source_shards": src.shards, "source_counts": src.counts, "fields": list(fields),
           "model": model}
    done = workdir / DONE
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return small, json.loads(done.read_text())
    link(Path(cfg.paths.world), Path(small.paths.world))
    for split in ("train", "test"):
        link(Path(cfg.paths.embedded(split)), Path(small.paths.embedded(split)))
    rows = subsample_embedded(cfg.paths.embedded("memory"), small.paths.embedded("memory"), fraction, seed)
    from reco.index.build import build_memory_index
    from reco.pipelines.neighbours import precompute_neighbours

    log.info("small memory: %d of %d rows; building its index and neighbours", rows["rows"], rows["of"])
    index_info = build_memory_index(small)
    neigh_info = precompute_neighbours(small)
    info = {"key": key, "rows": rows, "index": _small(index_info), "neighbours": _small(neigh_info)}
    atomic_write_text(done, json.dumps(info, indent=2, default=str))
    return small, info


def _small(info: Any) -> Any:
    """The scalar entries of a stage's info dict (for the record)."""
    if not isinstance(info, dict):
        return str(info)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None}

