"""``reco precompute-neighbours``: kNN of every training pair in the memory, cached for the trainer.

Beam job (DirectRunner; ``neighbours.direct_running_mode=multi_processing`` with
``direct_num_workers`` splits the output shards across worker processes)::

    Create(shard specs) -> Reshuffle -> ReadTrainShards -> SearchNeighbours -> Materialise -> WriteShards

* A shard spec is one OUTPUT shard: ``shard_size`` consecutive success rows of the training split
  (slices of one or more embedded input shards). Each worker holds one shard at a time, so memory
  does not grow with the number of training pairs; finished shards are skipped on resume.
* SearchNeighbours loads the memory once per worker (``DoFn.setup``, memory-mapped) and searches
  in batches of ``batch_size`` queries, excluding near-duplicates of the pair
  (``reco.index.neighbours``).

Output, under ``cfg.paths.neighbours``:

``ids/part-NNNNN.parquet`` (``reco.formats.neighbours_schema(k, searches)``)
    ``id`` (training pair id) and per search ``s`` in ``search_keys(fields)`` (e.g. ``v_img``):
    ``{s}_ids`` memory ids best first (-1 = none) and ``{s}_scores`` inner products (-inf = none).
    The schema metadata ``reco.stats`` holds the shard's exclusion counts (JSON).
``tensors/part-NNNNN.parquet`` (``reco.formats.tensors_schema(dim, k, fields)``)
    ``id``, ``v``, ``t`` (the pair's embeddings) and one column per context field (e.g.
    ``v_img_txt``): the (k, dim) block of the memory embeddings of the fused modality of the
    hits, flattened row-major, float16; zero rows where the id is -1. Rows are in the same order
    as in ``ids/``. Shards hold ``neighbours.shard_size`` rows (the last one fewer).
``ids/manifest.json``, ``tensors/manifest.json`` (kind ``neighbours`` / ``tensors``)
    complete shards in order, ``counts`` (rows per shard and ``total``), ``info`` (dim, k, fields,
    searches, model_id, dedup options, index info). Written after all shards; every file is
    written atomically. ``plan.json`` records what the shards were computed from: a run with
    other inputs or options starts over instead of resuming.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa

from reco import formats
from reco.config import RecoConfig
from reco.errors import ConfigError
from reco.index import neighbour_shards as shards
from reco.index.build import normalise
from reco.index.embedded import open_split, read_shard
from reco.index.neighbour_shards import ShardSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything the workers need (plain values: shipped to worker processes)."""

    index_folder: str
    out_folder: str
    dim: int
    k: int
    fields: tuple[str, ...]
    searches: tuple[str, ...]
    threshold: float
    dedup_on: tuple[str, ...]
    margin: int
    batch_size: int
    mmap: bool = True
    use_gpu: bool = False
    threads: int = 0


# --------------------------------------------------------------------------------------------
# DoFns and composite transforms
# --------------------------------------------------------------------------------------------

class _ReadFn(beam.DoFn):
    def __init__(self, dim: int):
        self.dim = dim

    def process(self, spec: ShardSpec):
        parts = [read_shard(path, self.dim, start, stop) for path, start, stop in spec.slices]
        yield {"spec": spec, "id": np.concatenate([p["id"] for p in parts]),   # fp16 -> unit norm
               "img": normalise(np.concatenate([p["image"] for p in parts])),
               "txt": normalise(np.concatenate([p["text"] for p in parts]))}


class _MemoryFn(beam.DoFn):
    load_indices = True

    def __init__(self, settings: Settings):
        self.s = settings

    def setup(self):
        import faiss

        from reco.index.memory import Memory

        if self.s.threads:
            faiss.omp_set_num_threads(self.s.threads)
        self.memory = Memory.load(self.s.index_folder, mmap=self.s.mmap,
                                  load_indices=self.load_indices, use_gpu=self.s.use_gpu)


class _SearchFn(_MemoryFn):
    def process(self, batch: dict):
        from reco.index.neighbours import neighbour_batch

        n, s = len(batch["id"]), self.s
        results = {q: (np.empty((n, s.k), np.float32), np.empty((n, s.k), np.int64)) for q in s.searches}
        stats = {"n_excluded": 0, "n_missing": 0}
        for start in range(0, n, s.batch_size):
            sl = slice(start, start + s.batch_size)
            found, info = neighbour_batch(self.memory, {"img": batch["img"][sl], "txt": batch["txt"][sl]},
                                          list(s.searches), s.k, threshold=s.threshold,
                                          dedup_on=s.dedup_on, margin=s.margin)
            for q, (scores, positions) in found.items():
                results[q][0][sl], results[q][1][sl] = scores, positions
            stats = {key: stats[key] + info[key] for key in stats}
        yield {**batch, "results": results, "stats": stats}


class _MaterialiseFn(_MemoryFn):
    load_indices = False

    def process(self, batch: dict):
        from reco.index.neighbours import materialise

        s, m = self.s, self.memory
        n = len(batch["id"])
        ids = pa.array(batch["id"], type=pa.int64())
        cols = {"id": ids}
        for q, (scores, positions) in batch["results"].items():
            mem_ids = np.where(positions >= 0, m.ids[np.maximum(positions, 0)], -1).astype(np.int64)
            cols[f"{q}_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(mem_ids.reshape(-1)), s.k)
            cols[f"{q}_scores"] = pa.FixedSizeListArray.from_arrays(
                pa.array(scores.reshape(-1), type=pa.float32()), s.k)
        schema = formats.neighbours_schema(s.k, list(s.searches))
        schema = schema.with_metadata({**schema.metadata, b"reco.stats": json.dumps(batch["stats"]).encode()})
        ids_table = pa.Table.from_pydict(cols, schema=schema)
        blocks = {f: np.empty((n, s.k * s.dim), np.float16) for f in s.fields}
        for start in range(0, n, s.batch_size):
            sl = slice(start, start + s.batch_size)
            part = {q: (sc[sl], pos[sl]) for q, (sc, pos) in batch["results"].items()}
            for f, arr in materialise(m, part, s.fields).items():
                blocks[f][sl] = arr.reshape(len(arr), -1)
        tcols = {"id": ids, "v": formats.to_fp16_list(batch["img"], s.dim),
                 "t": formats.to_fp16_list(batch["txt"], s.dim)}
        tcols.update({f: formats.to_fp16_list(blocks[f], s.k * s.dim) for f in s.fields})
        tensors = pa.Table.from_pydict(tcols, schema=formats.tensors_schema(s.dim, s.k, s.fields))
        yield {"spec": batch["spec"], "ids": ids_table, "tensors": tensors, "stats": batch["stats"]}


class _WriteFn(beam.DoFn):
    def __init__(self, out_folder: str):
        self.out = out_folder

    def process(self, shard: dict):
        name = shard["spec"].name
        formats.atomic_write_table(shard["ids"], os.path.join(self.out, "ids", name))
        formats.atomic_write_table(shard["tensors"], os.path.join(self.out, "tensors", name),
                                   use_dictionary=False, compression="none")  # fp16 decodes 5x faster
        yield {"name": name, "rows": shard["tensors"].num_rows, **shard["stats"]}


class ReadTrainShards(beam.PTransform):
    """ShardSpec -> {"spec", "id", "img", "txt"} (validated success rows of the training split)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def expand(self, specs):
        return specs | "ReadSlices" >> beam.ParDo(_ReadFn(self.dim))


class SearchNeighbours(beam.PTransform):
    """Adds "results": {search: (scores, positions)} with near-duplicates of the pair excluded."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def expand(self, batches):
        return batches | "Search" >> beam.ParDo(_SearchFn(self.settings))


class Materialise(beam.PTransform):
    """Search results -> the two Arrow tables of one output shard (ids and trainer tensors)."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def expand(self, batches):
        return batches | "Fetch" >> beam.ParDo(_MaterialiseFn(self.settings))


class WriteShards(beam.PTransform):
    """Writes ids/ then tensors/ atomically; yields {"name", "rows", "n_excluded", "n_missing"}."""

    def __init__(self, out_folder: str):
        super().__init__()
        self.out = out_folder

    def expand(self, shards):
        return shards | "Write" >> beam.ParDo(_WriteFn(self.out))


class PrecomputeNeighbours(beam.PTransform):
    """ShardSpecs -> written shard records (the whole job but its Create)."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def expand(self, specs):
        s = self.settings
        return (specs
                | "Spread" >> beam.Reshuffle()
                | "ReadTrainShards" >> ReadTrainShards(s.dim)
                | "SearchNeighbours" >> SearchNeighbours(s)
                | "Materialise" >> Materialise(s)
                | "WriteShards" >> WriteShards(s.out_folder))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def make_settings(cfg: RecoConfig, dim: int) -> Settings:
    """Validated worker settings from ``cfg.neighbours`` / ``cfg.index``."""
    n = cfg.neighbours
    searches = tuple(formats.search_keys(tuple(n.fields)))    # validates the field names
    if n.k < 1:
        raise ConfigError(f"neighbours.k must be >= 1, got {n.k}")
    bad = [m for m in n.dedup_on if m not in formats.MODALITIES]
    if bad:
        raise ConfigError(f"neighbours.dedup_on: unknown modality {bad[0]!r}; use img and/or txt")
    workers = max(n.direct_num_workers, 1) if n.direct_running_mode == "multi_processing" else 1
    return Settings(index_folder=str(cfg.paths.index), out_folder=str(cfg.paths.neighbours), dim=dim,
                    k=n.k, fields=tuple(n.fields), searches=searches, threshold=n.dedup_threshold,
                    dedup_on=tuple(n.dedup_on), margin=n.search_margin, batch_size=n.batch_size,
                    mmap=True, use_gpu=cfg.index.use_gpu,
                    threads=max((os.cpu_count() or 1) // workers, 1) if workers > 1 else 0)


def pipeline_options(cfg: RecoConfig, argv: list[str] | None = None):
    from apache_beam.options.pipeline_options import PipelineOptions

    n = cfg.neighbours
    if n.direct_running_mode == "multi_threading":
        raise ConfigError("neighbours.direct_running_mode: use in_memory or multi_processing")
    return PipelineOptions(argv or [], runner=n.runner, direct_running_mode=n.direct_running_mode,
                           direct_num_workers=n.direct_num_workers)


def run(specs: list[ShardSpec], settings: Settings, options) -> None:
    """Wire Create -> PrecomputeNeighbours and run it (blocking)."""
    with beam.Pipeline(options=options) as p:
        _ = p | "ShardSpecs" >> beam.Create(specs) | "Neighbours" >> PrecomputeNeighbours(settings)


def precompute_neighbours(cfg: RecoConfig, force: bool = False) -> dict:
    """kNN of every success pair of ``cfg.paths.embedded("train")`` in the memory index, written
    to ``cfg.paths.neighbours`` (see the module docstring); returns the manifest info.

    Args:
        cfg: run configuration (``cfg.neighbours``: k, fields, dedup, shard/batch sizes, runner).
        force: recompute every shard instead of resuming.
    """
    from reco.index.memory import Memory

    t0 = time.perf_counter()
    train = open_split(cfg.paths.embedded("train"))
    memory = Memory.load(cfg.paths.index, mmap=True, load_indices=False)
    memory.check_compatible(train.model_id, train.dim)          # before any work
    settings = make_settings(cfg, train.dim)
    specs = shards.plan_shards(train, cfg.neighbours.shard_size)
    out = Path(settings.out_folder)
    plan = {k: v for k, v in asdict(settings).items() if k not in ("out_folder", "threads", "use_gpu", "mmap")}
    plan.update(index=memory.info.get("fingerprint"), index_n=memory.n, model_id=memory.model_id,
                train=train.manifest.shards, counts=train.manifest.counts, shard_size=cfg.neighbours.shard_size)
    plan = {"fingerprint": shards.fingerprint(plan), **plan}
    out.mkdir(parents=True, exist_ok=True)
    if force and (out / shards.PLAN_FILE).exists():
        (out / shards.PLAN_FILE).unlink()
    shards.reset_if_stale(out, plan)
    todo = [s for s in specs if not shards.is_complete(out, s)]
    log.info("neighbours: %d pairs in %d shard(s), %d to compute", sum(s.n_rows for s in specs),
             len(specs), len(todo))
    if todo:
        run(todo, settings, pipeline_options(cfg))
    info = {"dim": settings.dim, "k": settings.k, "fields": list(settings.fields),
            "searches": list(settings.searches), "model_id": memory.model_id,
            "dedup_threshold": settings.threshold, "dedup_on": list(settings.dedup_on),
            "index_fingerprint": memory.info.get("fingerprint"), "memory_n": memory.n,
            "fingerprint": plan["fingerprint"]}
    info = shards.write_manifests(out, specs, info)
    seconds = time.perf_counter() - t0
    return {**info, "n_pairs": sum(s.n_rows for s in specs), "shards": len(specs),
            "computed_shards": len(todo), "skipped_shards": len(specs) - len(todo),
            "seconds": round(seconds, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="recompute every shard (no resume)")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    info = precompute_neighbours(cfg, force=bool(args.force))
    print(json.dumps({k: info[k] for k in ("n_pairs", "shards", "computed_shards", "skipped_shards",
                                           "k", "fields", "n_excluded", "n_missing", "seconds")}, indent=2))
    print(f"neighbours written to {cfg.paths.neighbours}")
    return 0
