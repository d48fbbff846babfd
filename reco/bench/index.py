"""Benchmark of the index stage: IVF-PQ(+refine) vs exact search, and the neighbour pass.

``bench_index(out_dir, quick)`` on synthetic clustered unit vectors (200k memory items):

* build-index as the project runs it (autofaiss, key chosen by ``reco.index.keys``, nprobe tuned);
* recall@10 and queries/s of the tuned IVF-PQ+refine index vs exact ``IndexFlatIP`` on fresh
  queries (never in the memory nor used for tuning);
* the neighbour pass (``pass``: the whole ``precompute_neighbours``: plan, Beam job on the
  DirectRunner reading the shards, searching, excluding, fetching, writing the Parquet files;
  manifests) against the BATCHED RAW SEARCH (``raw``: the same searches alone, batched as the
  pass batches them: ``neighbours.batch_size`` queries per faiss call, ``k + search_margin``
  hits, every search of the fields, same index loaded the same way, same faiss threads), each
  a FRESH process, paired and interleaved (:mod:`reco.bench.paired`: ratio median and IQR over
  ``rounds`` rounds, load before/after). Sizes: 200k training pairs (``--full``: 1M);
  the peak RSS of the pass at n is compared with a pass at n / 10 (it must stay flat);
* ``core``: the pass's faiss/numpy core in-process (search + exclusion, + fetch) against one
  unbatched search call (a diagnostic, not a claim);
* ``hard_distribution``: tuned recall@10 on clusters of ~1000 near items;
* ``build_memory``: build-index's peak RSS (VmHWM, in a fresh process) over a 200k x 512-d memory
  in 1,000-row shards, against the float32 data of one modality (``ratio``; ``growth_ratio``:
  above the process's memory before the build); alone: ``python -m reco.bench.index
  build-memory DIR 200000 512``.

Run: ``reco bench --only index`` (``--full`` adds a 512-d memory, recall only; ``--rounds N``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from reco import config as config_lib
from reco.bench.paired import ROUNDS, Claim, paired
from reco.index.build import build_memory_index, normalise
from reco.index.memory import Memory
from reco.index.synthetic import clustered_pairs, write_embedded

TRAIN_SHARD = 2500               # rows per embedded training shard (several per output shard)
COMMAND = "reco bench --only index"


def _threads() -> int:
    """faiss: all cores; torch (if some other bench loaded it): 1."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    return faiss.omp_get_max_threads()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status in MiB (``VmRSS``: resident now,
    ``VmHWM``: peak resident, reset by exec unlike ru_maxrss, which a child started with fork +
    exec inherits from its parent); NaN where the kernel does not report it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss where /proc does not say)."""
    peak = _status_mb("VmHWM")
    return round(peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu() - c0


def _qps(fn, n: int) -> float:
    return round(n / max(_timed(fn)[0], 1e-9), 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])), 4)


def _cfg(root: Path, options: dict | None = None):
    """The demo preset in ``root`` with the bench's ``index.*``/``neighbours.*`` options (given,
    or saved in ``root`` for the measured subprocesses)."""
    from reco.bench import options as bench_options

    cfg = config_lib.preset("demo", workdir=str(root))
    return bench_options.apply(cfg, bench_options.load(root) if options is None else options)


def _train_queries(cfg) -> dict[str, np.ndarray]:
    """The training pairs as the pass reads them (success rows, unit norm float32)."""
    from reco.embedded import open_split, read_split

    data = read_split(open_split(cfg.paths.embedded("train")))
    return {"img": normalise(data["image"]), "txt": normalise(data["text"])}


# --------------------------------------------------------------------------------------------
# the two measured processes (run as ``python -m reco.bench.index raw|pass WORKDIR``)
# --------------------------------------------------------------------------------------------

def measure_raw(workdir: str) -> dict:
    """The baseline: the pass's faiss searches alone, BATCHED as the pass batches them (its
    settings: ``neighbours.batch_size`` queries per call, k + margin hits, every search of the
    fields, e.g. image queries -> image index and text queries -> text index), on the index
    loaded as the pass loads it (memory-mapped, tuned nprobe / k_factor), faiss threads as in
    the pass. Times the searches only (not reading the queries nor loading the index)."""
    from reco.pipelines.neighbours.job import make_settings
    from reco.pipelines.neighbours.search import QUERY_MODALITY, split_search

    cfg = _cfg(Path(workdir))
    threads = _threads()
    queries = _train_queries(cfg)
    s = make_settings(cfg, queries["img"].shape[1])
    memory = Memory.load(s.index_folder, mmap=s.mmap, use_gpu=s.use_gpu, verify=False)
    k = min(s.k + s.margin, memory.n)
    n = len(queries["img"])

    def searches():
        for start in range(0, n, s.batch_size):
            for search in s.searches:
                query, index = split_search(search)
                memory.search(queries[QUERY_MODALITY[query]][start:start + s.batch_size], index, k)

    wall, cpu = _timed(searches)
    return {"pairs": n, "k": k, "batch_size": s.batch_size, "searches": list(s.searches),
            "threads": threads, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "rate": n / wall, "peak_rss_mb": _peak_rss_mb()}


def measure_pass(workdir: str, shard_size: int | None = None) -> dict:
    """precompute_neighbours (force) in this process: times, CPU and peak RSS."""
    from reco.pipelines.neighbours import precompute_neighbours

    cfg = _cfg(Path(workdir))
    if shard_size:
        cfg = dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, shard_size=shard_size))
    threads = _threads()
    c0, t0 = _cpu(), time.perf_counter()
    info = precompute_neighbours(cfg, force=True)
    wall = time.perf_counter() - t0
    return {"pairs": info["n_pairs"], "shards": info["shards"], "threads": threads, "rate": info["n_pairs"] / wall,
            "seconds": round(wall, 3), "info_seconds": info["seconds"], "job_seconds": info["job_seconds"],
            "step_seconds": info["step_seconds"], "cpu_seconds": round(_cpu() - c0, 3),
            "peak_rss_mb": _peak_rss_mb(),
            "n_excluded": info["n_excluded"], "n_missing": info["n_missing"]}


def _subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "reco.bench.index", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def _search_vs_exact(memory: Memory, queries: np.ndarray, k: int = 10) -> dict:
    corpus = normalise(memory.image_emb)
    exact = faiss.IndexFlatIP(corpus.shape[1])
    exact.add(corpus)
    truth = exact.search(queries, k)[1]
    approx = memory.indices["img"]
    found = approx.search(queries, k)[1]
    return {"recall_at_10": _recall(found, truth),
            "ivfpq_qps": _qps(lambda: approx.search(queries, k), len(queries)),
            "exact_qps": _qps(lambda: exact.search(queries, k), len(queries))}


def _core_vs_raw(cfg, memory: Memory, pair: dict, reps: int = 3) -> dict:
    """The pass's core in-process on the same queries as raw search (same k, both searches;
    best of ``reps`` interleaved runs), and the CPU cost of encoding the trainer tensors of these
    pairs as Parquet (``tensors_schema``, format ``tensors/2``: float16 blocks as fixed-size
    binary), which bounds the whole pass: ``cpu_ceiling_ratio = raw CPU / (raw CPU + encoding CPU)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco.pipelines.neighbours import shards
    from reco.pipelines.neighbours.search import materialise, neighbour_batch

    n, nb = len(pair["img"]), cfg.neighbours
    k_search = nb.k + nb.search_margin
    kw = dict(threshold=nb.dedup_threshold, dedup_on=tuple(nb.dedup_on), margin=nb.search_margin)
    searches = sorted({"_".join(f.split("_")[:2]) for f in nb.fields})
    found = {}

    def core(fetch: bool):
        found["results"], _ = neighbour_batch(memory, pair, searches, nb.k, **kw)
        if fetch:
            found["blocks"] = materialise(memory, found["results"], tuple(nb.fields))

    steps = {"raw": lambda: [memory.indices[m].search(pair[m], k_search) for m in ("img", "txt")],
             "search_exclude": lambda: core(False), "search_exclude_fetch": lambda: core(True)}
    best = {name: (float("inf"), float("inf")) for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            wall, cpu = _timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    ids = np.arange(n)
    table = shards.tensors_table(ids, pair["img"], pair["txt"], found["blocks"], memory.dim, nb.k,
                                 tuple(nb.fields))
    encode = min(_timed(lambda: pq.write_table(table, pa.BufferOutputStream(),
                                               **shards.WRITE_OPTIONS["tensors"]))[1] for _ in range(reps))
    raw_wall, raw_cpu = best["raw"]
    out = {"queries": n, "k_searched": k_search, "searches": searches,
           "raw_pairs_per_s": round(n / raw_wall, 1), "raw_cpu_s": round(raw_cpu, 3)}
    for name in ("search_exclude", "search_exclude_fetch"):
        out[f"{name}_pairs_per_s"] = round(n / best[name][0], 1)
        out[f"ratio_{name}"] = round(raw_wall / best[name][0], 3)
        out[f"cpu_ratio_{name}"] = round(raw_cpu / best[name][1], 3)
    out.update(tensors_parquet_encode_cpu_s=round(encode, 3),
               cpu_ceiling_ratio=round(raw_cpu / (raw_cpu + encode), 3))
    return out


def _pass_vs_raw(cfg, root: Path, n: int, centers, rounds: int) -> dict:
    """The neighbour pass on n training pairs against the batched raw searches (paired, fresh
    processes), and its peak RSS against a pass on n / 10 pairs (flat: about 1)."""
    dim = centers[0].shape[1]
    small = max(n // 10, 1)
    ri, rt, _, _ = clustered_pairs(small, dim, len(centers[0]), seed=2, centers=centers)
    write_embedded(cfg.paths.embedded("train"), ri, rt, shard_size=TRAIN_SHARD)
    tenth = _subprocess("pass", str(root))
    ri, rt, _, _ = clustered_pairs(n, dim, len(centers[0]), seed=2, centers=centers)
    write_embedded(cfg.paths.embedded("train"), ri, rt, shard_size=TRAIN_SHARD)
    del ri, rt
    print(f"index: neighbour pass on {n:,} pairs vs batched raw search, {rounds} rounds", flush=True)
    stats = paired(["-m", "reco.bench.index", "pass", str(root)], ["-m", "reco.bench.index", "raw", str(root)],
                   rounds)
    peak = sorted(p["a"]["peak_rss_mb"] for p in stats["pairs"])[len(stats["pairs"]) // 2]
    rss = {"pass_peak_rss_mb": peak, f"pass_{small}_peak_rss_mb": tenth["peak_rss_mb"],
           "rss_ratio": round(peak / tenth["peak_rss_mb"], 3)}
    return {"pairs": n, "paired": stats, "pass_tenth": tenth, **rss}


def _recall_claim(out: dict) -> dict:
    return Claim(f"index recall@10 (IVF-PQ + re-rank vs exact), {out['n_memory']:,} x {out['dim']}-d",
                 out["recall_at_10"], 0.95, command=COMMAND,
                 rates=f"ivfpq {out['ivfpq_qps']:,.0f} vs exact {out['exact_qps']:,.0f} q/s").as_dict()


def _pass_claims(out: dict, n: int) -> list[dict]:
    r = out[f"pass_{n}"]
    where = f"{n:,} pairs, memory {out['n_memory']:,} x {out['dim']}-d"
    return [Claim.from_paired(f"neighbour pass / batched raw search, {where}", r["paired"], 0.8, "pairs/s",
                              "pass", "raw", COMMAND).as_dict(),
            Claim(f"neighbour pass peak RSS, {n:,} / {n // 10:,} pairs", r["rss_ratio"], 1.2, at_most=True,
                  rates=f"{r['pass_peak_rss_mb']:,.0f} vs {r[f'pass_{n // 10}_peak_rss_mb']:,.0f} MB",
                  rounds=r["paired"]["rounds"], command=COMMAND).as_dict()]


def _one(root: Path, n_memory: int, dim: int, pass_size: int | None, options: dict, rounds: int) -> dict:
    from reco.bench import options as bench_options

    bench_options.save(root, options)
    cfg = _cfg(root)
    img, txt, _, centers = clustered_pairs(n_memory, dim, n_memory // 100, seed=0)
    write_embedded(cfg.paths.embedded("memory"), img, txt, shard_size=50000)
    queries, texts, _, _ = clustered_pairs(10000, dim, len(centers[0]), seed=7, centers=centers)
    write_embedded(cfg.paths.embedded("train"), queries, texts, shard_size=TRAIN_SHARD)
    threads = _threads()
    t0 = time.perf_counter()
    info = build_memory_index(cfg, force=True)
    out = {"n_memory": n_memory, "dim": dim, "faiss_threads": threads,
           "build_index_seconds": round(time.perf_counter() - t0, 1),
           "key": info["keys"]["img"], "nprobe": info["nprobe"]["img"],
           "k_factor": info["indices"]["img"]["k_factor"], "tuning_recall": info["recall"]["img"],
           "index_bytes": info["indices"]["img"]["size_bytes"]}
    memory = Memory.load(cfg.paths.index, mmap=True)
    out.update(_search_vs_exact(memory, queries[:2000]))
    out["core"] = _core_vs_raw(cfg, memory, _train_queries(cfg))
    del memory
    out["claims"] = [_recall_claim(out)]
    if pass_size:
        out[f"pass_{pass_size}"] = _pass_vs_raw(cfg, root, pass_size, centers, rounds)
        out["claims"] += _pass_claims(out, pass_size)
    return out


def hard_recall(n: int = 50_000, dim: int = 64, budgets: tuple[str, ...] = ("100M", "5M")) -> list[dict]:
    """Tuned recall@10 on the hard distribution (clusters of ~1000 near items) for the key each
    memory budget gets (``python -m reco.bench.index hard``)."""
    from reco.index.build import build_one
    from reco.index.config import IndexConfig

    img, _, _, _ = clustered_pairs(n, dim, max(n // 1000, 1), seed=0)
    out = []
    for budget in budgets:
        cfg = IndexConfig(exact_below=1000, max_index_memory_usage=budget, allow_low_recall=True)
        _, info = build_one(normalise(img), "img", cfg)
        out.append({"n": n, "dim": dim, "budget": budget, "key": info["key"], "recall_at_10": info["recall"],
                    "nprobe": info["nprobe"], "k_factor": info["k_factor"]})
    return out


# --------------------------------------------------------------------------------------------
# build-index memory (issue 21: peak <= 1.5x the float32 data of one modality)
# --------------------------------------------------------------------------------------------

MEMORY_SHARD = 1000              # rows per memory shard, as the embed stage writes them


def write_build_input(workdir: str, n: int, dim: int) -> None:
    """The synthetic memory of :func:`measure_build` (``python -m reco.bench.index build-input``:
    generated in its own process, so that no process measured holds it)."""
    cfg = _cfg(Path(workdir))
    img, txt, _, _ = clustered_pairs(n, dim, max(n // 100, 1), seed=0)
    write_embedded(cfg.paths.embedded("memory"), img, txt, shard_size=MEMORY_SHARD)


def measure_build(workdir: str) -> dict:
    """build-index (force) in this process, its peak RSS against the float32 data of one
    modality (n x dim x 4 bytes): ``ratio`` = peak / data, ``growth_ratio`` = (peak - resident
    before the build, imports done) / data. The peak counter is reset before the build."""
    import autofaiss  # noqa: F401  (imported by the build: a fixed cost, not the data's)

    cfg = _cfg(Path(workdir))
    threads = _threads()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")        # reset VmHWM (Linux)
    t0 = time.perf_counter()
    info = build_memory_index(cfg, force=True)
    seconds, peak = time.perf_counter() - t0, _status_mb("VmHWM")
    data = info["n"] * info["dim"] * 4 / 2 ** 20
    return {"n": info["n"], "dim": info["dim"], "key": info["keys"]["img"], "threads": threads,
            "float32_data_mb": round(data, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "ratio": round(peak / data, 3),
            "growth_ratio": round((peak - before) / data, 3), "seconds": round(seconds, 1)}


def build_memory(root: Path, n: int, dim: int, options: dict) -> dict:
    """Peak memory of build-index over an ``n`` x ``dim`` memory (both modalities), measured in
    a fresh process (:func:`measure_build`)."""
    from reco.bench import options as bench_options

    bench_options.save(root, options)
    if not (_cfg(root).paths.embedded("memory") / "manifest.json").exists():
        _subprocess("build-input", str(root), str(n), str(dim))
    return {"claim": "build-index peak RSS <= 1.5x the float32 data of one modality",
            **_subprocess("build", str(root))}


def bench_index(out_dir: str | Path, quick: bool = True, options: dict | None = None,
                rounds: int | None = None) -> dict:
    """Run the benchmark in ``out_dir`` (work folders are kept there); returns the figures with
    ``claims`` (rows of ``summary.md``). ``options``: ``index.*``/``neighbours.*`` values
    (``reco bench --set``) over the demo preset; ``rounds``: pass/raw pairs (default 3, --full 10)."""
    out_dir, options = Path(out_dir), options or {}
    rounds = rounds or ROUNDS["quick" if quick else "full"]
    results = {"note": ("raw = the pass's searches alone, batched as the pass batches them "
                        "(neighbours.batch_size, k + search_margin, every search), same index "
                        "loaded the same way; ratio = pass / raw pairs per second per round of "
                        "fresh processes (A,B,B,A...)"),
               "d64": _one(out_dir / "d64", 200_000, 64, 200_000 if quick else 1_000_000, options, rounds)}
    if not quick:
        results["d512"] = _one(out_dir / "d512", 200_000, 512, None, options, rounds)
    results["hard_distribution"] = hard_recall()
    results["claims"] = [c for key in ("d64", "d512") if key in results for c in results[key].pop("claims")]
    results["build_memory"] = build_memory(out_dir / "build_memory", 200_000, 512, options)
    build = results["build_memory"]
    results["claims"].append(Claim(      # growth: the fixed ~130 MB of imports is not the data's
        claim=f"build-index memory growth / float32 data of one modality, {build['n'] // 1000}k x "
              f"{build['dim']}-d",
        value=build["growth_ratio"], goal=1.5, at_most=True,
        rates=f"peak {build['peak_rss_mb']:.0f} MB = {build['ratio']}x of {build['float32_data_mb']:.0f} MB",
        command="python -m reco.bench.index build-memory DIR 200000 512").as_dict())
    results["peak_rss_mb"] = _peak_rss_mb()
    return results


if __name__ == "__main__":               # the measured processes, see measure_raw / measure_pass
    import logging

    logging.disable(logging.WARNING)
    what = sys.argv[1]
    if what == "hard":
        result = hard_recall()
    elif what == "build-input":
        result = write_build_input(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif what == "build":
        result = measure_build(sys.argv[2])
    elif what == "build-memory":           # python -m reco.bench.index build-memory OUT N DIM
        result = build_memory(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), {})
    else:
        result = measure_raw(sys.argv[2]) if what == "raw" else measure_pass(sys.argv[2])
    print(json.dumps(result))
