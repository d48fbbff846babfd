"""``reco precompute-neighbours``: kNN of every training pair in the memory, cached for the trainer.

Beam job (DirectRunner by default; ``neighbours.direct_running_mode=multi_processing`` with
``direct_num_workers`` splits the output shards across worker processes; any engine of
``reco.pipelines.runners`` through ``beam_options``, e.g. ``--runner=portable``,
``--runner=dataflow``; with Dataflow's ``--dry_run=True`` the job is only built: no shard is
written, no manifest either, and the info says ``"dry_run": true``)::

    Create(shard specs) -> Spread (Reshuffle) -> NeighbourShards: one DoFn call per output shard
                                                 read -> search -> fetch -> write

* A shard spec is one OUTPUT shard: ``shard_size`` consecutive success rows of the training split
  (slices of one or more embedded input shards). Each worker holds one shard at a time, so memory
  does not grow with the number of training pairs; finished shards are skipped on resume.
* The steps of a shard run fused in one DoFn (:class:`_ShardFn`), so that no large array is
  ever encoded between Beam stages: the DoFn loads the memory once per worker (``DoFn.setup``,
  memory-mapped), searches each block of ``batch_size`` queries with one faiss call per search
  (faiss's OpenMP threads over the queries), excludes near-duplicates of the pair and fetches
  the hits' embeddings vectorised (``reco.pipelines.neighbours.search``), and writes the two
  Parquet files itself (``reco.pipelines.neighbours.shards``). Three stages overlap: while shard i is fetched
  (single-threaded), shard i+1 is READ in a background thread (not during the search: a reader
  competing with faiss's threads slowed the search by more than it saved), and shard i is
  WRITTEN in another background thread while shard i+1 is searched (at most one shard waits on
  each side). It outputs one small record per shard
  ({"name", "rows", "n_excluded", "n_missing"}); the driver checks the row counts of the files
  after the run, so the job's output never needs to come back from the runner. Beam counters
  (namespace ``reco.neighbours``) hold the pairs done and the milliseconds spent in each step.

Output: ``reco.pipelines.neighbours.shards`` (format, planning, writing, manifests).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import StandardOptions

from reco import formats
from reco.config import RecoConfig
from reco.console import advance, print_summary, tracked
from reco.embedded import open_split, read_shard
from reco.errors import ConfigError, FormatError
from reco.index.build import normalise
from reco.options import value_flags
from reco.pipelines.neighbours import shards
from reco.pipelines.neighbours.config import NeighboursConfig
from reco.pipelines.neighbours.shards import ShardSpec
from reco.record import FILE as RECORD_FILE
from reco.record import Record, json_digest, locked, options_of, outputs_of

log = logging.getLogger(__name__)
METRICS = "reco.neighbours"
STEPS = ("read", "search", "fetch", "write")


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
    threads: int = 0                   # faiss OpenMP threads per worker; 0 = faiss's default


# --------------------------------------------------------------------------------------------
# one output shard (no Beam): read -> search -> fetch -> write
# --------------------------------------------------------------------------------------------

def read_pairs(spec: ShardSpec, dim: int) -> dict[str, np.ndarray]:
    """{"id", "img", "txt"}: the validated success rows of the spec, embeddings unit-norm float32."""
    parts = [read_shard(path, dim, start, stop) for path, start, stop in spec.slices]
    return {"id": np.concatenate([p["id"] for p in parts]),
            "img": normalise(np.concatenate([p["image"] for p in parts])),
            "txt": normalise(np.concatenate([p["text"] for p in parts]))}


def search_shard(memory, pair: dict[str, np.ndarray], s: Settings):
    """{search: (scores (n, k), positions (n, k))} and exclusion counts, ``batch_size`` queries
    per faiss call (one call per search and block)."""
    from reco.pipelines.neighbours.search import neighbour_batch

    n = len(pair["id"])
    found = {q: (np.empty((n, s.k), np.float32), np.empty((n, s.k), np.int64)) for q in s.searches}
    stats = {"n_excluded": 0, "n_missing": 0}
    for start in range(0, n, s.batch_size):
        sl = slice(start, start + s.batch_size)
        block, info = neighbour_batch(memory, {"img": pair["img"][sl], "txt": pair["txt"][sl]},
                                      list(s.searches), s.k, threshold=s.threshold,
                                      dedup_on=s.dedup_on, margin=s.margin)
        for q, (scores, positions) in block.items():
            found[q][0][sl], found[q][1][sl] = scores, positions
        stats = {key: stats[key] + info[key] for key in stats}
    return found, stats


def shard_tables(memory, pair: dict[str, np.ndarray], found: dict, stats: dict, s: Settings) -> dict:
    """The ids and tensors tables of the shard (hits' embeddings fetched as float16)."""
    from reco.pipelines.neighbours.search import materialise

    ids, hits = np.asarray(memory.ids), {}
    for q, (scores, positions) in found.items():
        hits[q] = (scores, np.where(positions >= 0, np.take(ids, np.maximum(positions, 0)), -1))
    blocks = materialise(memory, found, s.fields)
    return {"ids": shards.ids_table(pair["id"], hits, s.k, stats),
            "tensors": shards.tensors_table(pair["id"], pair["img"], pair["txt"], blocks,
                                            s.dim, s.k, s.fields)}


def read_timed(spec: ShardSpec, dim: int) -> tuple[dict[str, np.ndarray], float]:
    """:func:`read_pairs` and its wall seconds (run ahead in the DoFn's read thread)."""
    t0 = time.perf_counter()
    pair = read_pairs(spec, dim)
    return pair, time.perf_counter() - t0


def search_step(memory, spec: ShardSpec, read, s: Settings) -> dict:
    """The search phase of a shard from its :func:`read_timed` result: {"spec", "pair", "found",
    "stats", "seconds"} (multi-threaded: faiss's OpenMP threads)."""
    pair, read_seconds = read
    t0 = time.perf_counter()
    found, stats = search_shard(memory, pair, s)
    return {"spec": spec, "pair": pair, "found": found, "stats": stats,
            "seconds": {"read": read_seconds, "search": time.perf_counter() - t0}}


def fetch_step(memory, searched: dict, s: Settings) -> tuple[dict, dict]:
    """The fetch phase (single-threaded numpy/pyarrow): the tables of the shard (nothing written)
    and its record {"name", "rows", "n_excluded", "n_missing", "seconds": {step: seconds}}."""
    spec, t0 = searched["spec"], time.perf_counter()
    tables = shard_tables(memory, searched["pair"], searched["found"], searched["stats"], s)
    if tables["tensors"].num_rows != spec.n_rows:
        raise FormatError(f"{spec.name}: {tables['tensors'].num_rows} rows read, {spec.n_rows} planned; "
                          f"the training split changed during the run")
    return tables, {"name": spec.name, "rows": spec.n_rows, **searched["stats"],
                    "seconds": {**searched["seconds"], "fetch": time.perf_counter() - t0}}


def compute_shard(memory, spec: ShardSpec, s: Settings) -> tuple[dict, dict]:
    """read -> search -> fetch of one output shard, in this thread (see :func:`fetch_step`)."""
    return fetch_step(memory, search_step(memory, spec, read_timed(spec, s.dim), s), s)


def write_computed(out_folder: str, tables: dict, record: dict) -> dict:
    """Write the tables of :func:`compute_shard` (atomically); the record with the write time."""
    t0 = time.perf_counter()
    shards.write_shard(out_folder, record["name"], tables)
    return {**record, "seconds": {**record["seconds"], "write": time.perf_counter() - t0}}


# --------------------------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------------------------

class _ShardFn(beam.DoFn):
    """ShardSpec -> {"name", "rows", "n_excluded", "n_missing"} once the shard's files are written.

    Three stages overlap, each in its own thread, so that the single-threaded work runs while
    faiss searches: the next shard is READ ahead (Parquet decoding and numpy, without the GIL),
    the current one is searched and fetched, and the previous one is WRITTEN (Parquet encoding,
    C++, without the GIL). At most one shard waits on each side, so memory stays bounded. A
    shard is therefore computed one call after it arrives (the last one in finish_bundle), and
    its record is output when its files are written (by a later call or by finish_bundle)."""

    def __init__(self, settings: Settings):
        self.s = settings

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        from reco.index.memory import Memory

        self._threads()
        self.memory = Memory.load(self.s.index_folder, mmap=self.s.mmap, use_gpu=self.s.use_gpu,
                                  verify=False)          # the driver checked it
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="neighbours-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="neighbours-write")
        self.pending = self.ahead = None

    def _threads(self):
        if self.s.threads:                  # OpenMP settings are per calling thread
            import faiss

            faiss.omp_set_num_threads(self.s.threads)

    def start_bundle(self):
        self.pending = self.ahead = None

    def _written(self):
        """Wait for the pending write; its record (counters updated in the bundle's thread)."""
        if self.pending is None:
            return []
        record, self.pending = self.pending.result(), None
        beam.metrics.Metrics.counter(METRICS, "pairs").inc(record["rows"])
        if not advance(self.s.out_folder, record["rows"]):     # no driver bar in this process
            log.info("neighbours: %s written (%d pairs)", record["name"], record["rows"])
        for step, seconds in record.pop("seconds").items():
            beam.metrics.Metrics.counter(METRICS, f"{step}_ms").inc(int(seconds * 1000))
        return [record]

    def _advance(self, spec: ShardSpec | None):
        """Search the shard read ahead; start reading ``spec`` (None: no more) while the
        searched shard is fetched (so that reading never competes with faiss's threads), then
        hand it to the writer. The records of the writes finished meanwhile."""
        searched = None
        if self.ahead is not None:
            previous, read = self.ahead
            searched = search_step(self.memory, previous, read.result(), self.s)
        self.ahead = None if spec is None else (spec, self.reader.submit(read_timed, spec, self.s.dim))
        if searched is None:
            return []
        tables, record = fetch_step(self.memory, searched, self.s)
        done = self._written()
        self.pending = self.writer.submit(write_computed, self.s.out_folder, tables, record)
        return done

    def process(self, spec: ShardSpec):
        self._threads()
        yield from self._advance(spec)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        self._threads()
        for record in self._advance(None) + self._written():
            yield GlobalWindows.windowed_value(record)

    def teardown(self):
        for pool in (getattr(self, "reader", None), getattr(self, "writer", None)):
            if pool is not None:
                pool.shutdown(wait=True)


class PrecomputeNeighbours(beam.PTransform):
    """ShardSpecs -> records of the written shards (the whole job but its Create)."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def expand(self, specs):
        return (specs
                | "Spread" >> beam.Reshuffle()
                | "NeighbourShards" >> beam.ParDo(_ShardFn(self.settings)))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def make_settings(cfg: RecoConfig, dim: int, options=None) -> Settings:
    """Validated worker settings from ``cfg.neighbours`` / ``cfg.index``; with several DirectRunner
    worker processes (``options``, default: from cfg), faiss threads = cores / workers."""
    n = cfg.neighbours
    searches = tuple(formats.search_keys(tuple(n.fields)))    # validates the field names
    if n.k < 1:
        raise ConfigError(f"neighbours.k must be >= 1, got {n.k}")
    if n.batch_size < 1:
        raise ConfigError(f"neighbours.batch_size must be >= 1, got {n.batch_size}")
    bad = [m for m in n.dedup_on if m not in formats.MODALITIES]
    if bad:
        raise ConfigError(f"neighbours.dedup_on: unknown modality {bad[0]!r}; use img and/or txt")
    direct = (options or pipeline_options(cfg)).get_all_options()
    cores = os.cpu_count() or 1
    workers = ((direct.get("direct_num_workers") or cores)
               if direct.get("direct_running_mode") == "multi_processing" else 1)
    return Settings(index_folder=str(cfg.paths.index), out_folder=str(cfg.paths.neighbours), dim=dim,
                    k=n.k, fields=tuple(n.fields), searches=searches, threshold=n.dedup_threshold,
                    dedup_on=tuple(n.dedup_on), margin=n.search_margin, batch_size=n.batch_size,
                    mmap=True, use_gpu=cfg.index.use_gpu,
                    threads=max(cores // workers, 1) if workers > 1 else 0)


def shard_bytes(n: NeighboursConfig, dim: int) -> int:
    """Rough peak bytes of one shard in a worker: hits (float32 + int64) per search and the
    (k, dim) context blocks (float32 while built, float16 written) per field."""
    searches = len(formats.search_keys(tuple(n.fields)))
    return n.shard_size * (n.k + n.search_margin) * (12 * searches + 6 * dim * len(n.fields))


def check_k_fits(n: NeighboursConfig, memory_n: int, dim: int, budget: int | None = None) -> None:
    """Before any work: neighbours.k (range [1, 1024] in .config) must fit the
    machine's memory with the shard size (``budget``: half the physical memory); k above the
    memory's size pads every row with -1 (logged)."""
    budget = budget or _physical_bytes() // 2
    need = shard_bytes(n, dim)
    if need > budget:
        fit = max(1, budget // max(1, need // max(1, n.k + n.search_margin)) - n.search_margin)
        raise ConfigError(f"neighbours.k={n.k}: a shard of {n.shard_size} pairs would need "
                          f"{need / 2**30:.1f} GiB (budget {budget / 2**30:.1f} GiB); use "
                          f"neighbours.k <= {fit} or a smaller neighbours.shard_size")
    if n.k > memory_n:
        log.warning("neighbours.k=%d exceeds the memory's %d items: the last %d of every row are "
                    "padding (-1)", n.k, memory_n, n.k - memory_n)


def _physical_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def pipeline_options(cfg: RecoConfig, beam_options=None):
    """PipelineOptions from ``cfg.neighbours`` (runner, direct running mode and workers), then
    ``beam_options`` (Beam flags such as ``--runner=portable``, or PipelineOptions), which win;
    runner aliases, engine presets and required options: :func:`reco.pipelines.runners.pipeline_options`
    (ConfigError before any work)."""
    from reco.pipelines import runners

    n = cfg.neighbours
    return runners.pipeline_options(beam_options, runner=n.runner, direct_running_mode=n.direct_running_mode,
                                    direct_num_workers=n.direct_num_workers)


def is_dry_run(options) -> bool:
    """Dataflow's ``--dry_run``: the job is translated, not run (Beam tests the flag's truth)."""
    from apache_beam.options.pipeline_options import TestOptions

    return (options.view_as(StandardOptions).runner or "").endswith("DataflowRunner") \
        and bool(options.view_as(TestOptions).dry_run)


def _step_seconds(result) -> dict:
    """{step: seconds, "pairs": n} from the job's counters ({} where the runner has none)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(METRICS))["counters"]
    except Exception:                                   # runner without metrics
        return {}
    out = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        name = c.key.metric.name
        out[name] = out.get(name, 0) + (value or 0)
    return {(k[:-3] if k.endswith("_ms") else k): (v / 1000 if k.endswith("_ms") else v)
            for k, v in out.items()}


def run(specs: list[ShardSpec], settings: Settings, options) -> dict:
    """Wire Create -> PrecomputeNeighbours, run it (blocking); the job's step counters."""
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "ShardSpecs" >> beam.Create(specs) | "Neighbours" >> PrecomputeNeighbours(settings)
    result = pipeline.run()
    result.wait_until_finish()
    return _step_seconds(result)


def precompute_neighbours(cfg: RecoConfig, force: bool = False,
                          beam_options: list[str] | None = None) -> dict:
    """kNN of every success pair of ``cfg.paths.embedded("train")`` in the memory index, written
    to ``cfg.paths.neighbours`` (see the module docstring); returns the manifest info.

    Args:
        cfg: run configuration (``cfg.neighbours``: k, fields, dedup, shard/batch sizes, runner).
        force: recompute every shard instead of resuming.
        beam_options: extra Beam pipeline flags (e.g. ``["--runner=PortableRunner",
            "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"]``); they override
            the runner options of ``cfg.neighbours``.

    The info holds ``seconds`` (the whole call), ``job_seconds`` (the Beam job, startup
    included) and, where the runner reports counters, ``step_seconds`` (time in each step).
    """
    with locked(cfg.paths.neighbours, "precompute-neighbours"):
        return _precompute(cfg, force, beam_options)


# NeighboursConfig options that do not change the shards (how fast, where the job runs; the
# eval dedup threshold shapes the index, which is an input)
NOT_SHAPING = ("batch_size", "runner", "direct_running_mode", "direct_num_workers",
               "eval_dedup_threshold")


def _check_record(out: Path, planned: Record, force: bool) -> None:
    """Refuse outputs recorded with other options, inputs or model (StaleError naming them);
    recorded shards still on disk must have their digests (missing ones are recomputed).
    Records the plan when there is none (or with ``force``)."""
    record = None if force else Record.read(out, "neighbours")
    if record is None:
        (out / RECORD_FILE).unlink(missing_ok=True)
        planned.write(out)
        return
    record.check_same(out, options=planned.options, inputs=planned.inputs,
                      model_id=planned.model_id, command="precompute-neighbours")
    record.verify(out, [n for n in record.outputs if (out / n).exists()],
                  command="precompute-neighbours")


def _precompute(cfg: RecoConfig, force: bool, beam_options) -> dict:
    from reco.index.memory import Memory

    t0 = time.perf_counter()
    train = open_split(cfg.paths.embedded("train"))             # checked against its record
    memory = Memory.load(cfg.paths.index, mmap=True, load_indices=False)   # and the index's
    memory.check_compatible(train.model_id, train.dim)          # before any work
    check_k_fits(cfg.neighbours, memory.n, train.dim)
    options = pipeline_options(cfg, beam_options)
    settings = make_settings(cfg, train.dim, options)
    specs = shards.plan_shards(train, cfg.neighbours.shard_size)
    out = Path(settings.out_folder)
    plan = {k: v for k, v in asdict(settings).items()
            if k not in ("out_folder", "index_folder", "batch_size", "threads", "use_gpu", "mmap")}
    plan.update(index=memory.info.get("fingerprint"), index_n=memory.n, model_id=memory.model_id,
                train=train.manifest.shards, counts=train.manifest.counts, shard_size=cfg.neighbours.shard_size,
                tensors_format=formats.TENSORS_FORMAT, embedded_format=formats.EMBEDDED_FORMAT)
    plan = {"fingerprint": shards.fingerprint(plan), **plan}
    out.mkdir(parents=True, exist_ok=True)
    planned = Record(stage="neighbours", model_id=memory.model_id,
                     options={**options_of("neighbours", cfg.neighbours, NOT_SHAPING),
                              "tensors_format": formats.TENSORS_FORMAT},
                     inputs={"train": train.digest, "index": memory.digest or json_digest(memory.info)})
    _check_record(out, planned, force)
    if force and (out / shards.PLAN_FILE).exists():
        (out / shards.PLAN_FILE).unlink()
    shards.reset_if_stale(out, plan)
    todo = [s for s in specs if not shards.is_complete(out, s)]
    log.info("neighbours: %d pairs in %d shard(s), %d to compute", sum(s.n_rows for s in specs),
             len(specs), len(todo))
    t_job = time.perf_counter()
    with tracked(settings.out_folder, total=sum(s.n_rows for s in todo), desc="neighbours", unit="pair"):
        steps = run(todo, settings, options) if todo else {}
    job_seconds = time.perf_counter() - t_job
    info = {"dim": settings.dim, "k": settings.k, "fields": list(settings.fields),
            "searches": list(settings.searches), "model_id": memory.model_id,
            "dedup_threshold": settings.threshold, "dedup_on": list(settings.dedup_on),
            "index_fingerprint": memory.info.get("fingerprint"), "memory_n": memory.n,
            "fingerprint": plan["fingerprint"], "tensors_format": formats.TENSORS_FORMAT}
    dry_run = bool(todo) and is_dry_run(options)
    if dry_run:                     # nothing ran: no shard to check, no manifest to write
        log.warning("neighbours: --dry_run: the %s job was built, not run; no shards or manifests "
                    "written", options.view_as(StandardOptions).runner)
        info.update(n_excluded=0, n_missing=0, manifests="skipped (dry run)")
    else:
        info = shards.write_manifests(out, specs, info)         # checks every shard's row counts
        rows = {f"{sub}/{s.name}": s.n_rows for s in specs for sub in shards.SUBDIRS}
        planned.outputs, planned.complete = outputs_of(out, sorted(rows), rows), True
        planned.counts = {"pairs": sum(s.n_rows for s in specs), "shards": len(specs)}
        planned.write(out)
    return {**info, "dry_run": dry_run, "n_pairs": sum(s.n_rows for s in specs), "shards": len(specs),
            "computed_shards": len(todo), "skipped_shards": len(specs) - len(todo),
            "computed_pairs": sum(s.n_rows for s in todo), "seconds": round(time.perf_counter() - t0, 2),
            "job_seconds": round(job_seconds, 2),
            "step_seconds": {k: round(v, 2) for k, v in steps.items() if k in STEPS}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="recompute every shard (no resume)")
    parser.add_argument("--beam-option", action="append", default=None, metavar="FLAG",
                        help="extra Beam pipeline flag, repeatable (e.g. --beam-option=--runner=PortableRunner)")
    io = parser.add_argument_group("inputs and outputs apart from the work directory (any "
                                   "fsspec path; mirrored into the work directory)")
    value_flags(io, ("--train", "PATH", "embedded training pairs (default WORKDIR/embeddings/train)"),
                ("--index", "PATH", "memory index folder, build-index's output (default WORKDIR/index)"),
                ("--output", "PATH", "also publish the neighbours folder there (written in WORKDIR/neighbours)"))


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.remote import published, staged

    with staged({cfg.paths.embedded("train"): ("train", args.train),
                 cfg.paths.index: ("index", args.index)},
                {cfg.paths.neighbours: ("output", args.output)}):
        info = precompute_neighbours(cfg, force=bool(args.force), beam_options=args.beam_option)
    print_summary("precompute-neighbours", summary(info, published(cfg.paths.neighbours, args.output)),
                  data=info)
    return 0


def summary(info: dict, folder) -> dict:
    """The stage summary (reco.console.print_summary)."""
    from reco.console import seconds

    done = f"{info['computed_shards']} computed" + \
        (f", {info['skipped_shards']} already complete" if info["skipped_shards"] else "")
    return {"pairs": f"{info['n_pairs']} in {info['shards']} shard(s): {done}; {seconds(info['seconds'])}",
            "neighbours": f"k {info['k']}, fields {', '.join(info['fields'])}",
            "excluded": f"{info.get('n_excluded', 0)} near-duplicate hits, {info.get('n_missing', 0)} "
                        f"missing",
            "output": "job built (dry run), nothing written" if info["dry_run"] else folder}
