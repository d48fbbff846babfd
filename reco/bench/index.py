"""Benchmark of the index stage: IVF-PQ(+refine) vs exact search, and the neighbour pass.

``bench_index(out_dir, quick)`` on synthetic clustered unit vectors (>= 200k memory items):

* build-index as the project runs it (autofaiss, key chosen by ``reco.index.keys``, nprobe tuned);
* recall@10 and queries/s of the tuned IVF-PQ+refine index vs exact ``IndexFlatIP`` on fresh
  queries (never in the memory nor used for tuning);
* the neighbour pass's throughput vs raw faiss search on the same index: the search core alone
  (k + margin hits, duplicate exclusion, materialisation of one field), and the whole Beam job
  (read shards, search, materialise, write Parquet) for two training-set sizes, with the
  tracemalloc peak of each (it should not grow with the number of pairs) and the process's
  peak RSS.
"""
from __future__ import annotations

import dataclasses
import resource
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np

from reco import config as config_lib
from reco.index.build import build_memory_index, normalise
from reco.index.memory import Memory
from reco.index.neighbours import materialise, neighbour_batch
from reco.index.synthetic import clustered_pairs, write_embedded


def _qps(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return round(n / max(time.perf_counter() - t0, 1e-9), 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])), 4)


def _setup(root: Path, n_memory: int, n_train: int, dim: int, n_clusters: int):
    cfg = config_lib.preset("demo", workdir=str(root))
    img, txt, _, centers = clustered_pairs(n_memory, dim, n_clusters, seed=0)
    write_embedded(cfg.paths.embedded("memory"), img, txt, shard_size=50000)
    ri, rt, _, _ = clustered_pairs(n_train, dim, n_clusters, seed=2, centers=centers)
    write_embedded(cfg.paths.embedded("train"), ri, rt, shard_size=2500)
    return cfg, centers


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


def _core_vs_raw(memory: Memory, pair: dict, k: int, margin: int) -> dict:
    index = memory.indices["img"]
    raw = _qps(lambda: index.search(pair["img"], k), len(pair["img"]))
    kw = dict(threshold=0.99995, dedup_on=("img",), margin=margin)
    search_only = _qps(lambda: neighbour_batch(memory, pair, ["v_img"], k, **kw), len(pair["img"]))

    def full():
        results, _ = neighbour_batch(memory, pair, ["v_img"], k, **kw)
        materialise(memory, results, ("v_img_txt",))
    with_fetch = _qps(full, len(pair["img"]))
    return {"raw_faiss_qps_k16": raw, "pass_search_qps": search_only, "pass_search_fetch_qps": with_fetch,
            "ratio_search": round(search_only / raw, 3), "ratio_search_fetch": round(with_fetch / raw, 3)}


def _beam_pass(cfg, n_pairs: int, raw_qps_two_searches: float) -> dict:
    from reco.pipelines.neighbours import precompute_neighbours

    cfg = dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, shard_size=2500))
    tracemalloc.start()
    info = precompute_neighbours(cfg, force=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pairs_per_s = info["n_pairs"] / info["seconds"]
    return {"pairs": info["n_pairs"], "seconds": info["seconds"], "pairs_per_s": round(pairs_per_s, 1),
            "ratio_vs_raw_search": round(pairs_per_s / raw_qps_two_searches, 3),
            "tracemalloc_peak_mb": round(peak / 2**20, 1)}


def _one(root: Path, n_memory: int, dim: int, n_train_sizes: tuple[int, ...]) -> dict:
    cfg, centers = _setup(root, n_memory, max(n_train_sizes), dim, n_clusters=n_memory // 100)
    t0 = time.perf_counter()
    info = build_memory_index(cfg, force=True)
    out = {"n_memory": n_memory, "dim": dim, "build_index_seconds": round(time.perf_counter() - t0, 1),
           "key": info["keys"]["img"], "nprobe": info["nprobe"]["img"],
           "k_factor": info["indices"]["img"]["k_factor"], "tuning_recall": info["recall"]["img"],
           "index_bytes": info["indices"]["img"]["size_bytes"]}
    memory = Memory.load(cfg.paths.index)
    queries, texts, _, _ = clustered_pairs(2000, dim, len(centers[0]), seed=7, centers=centers)
    out.update(_search_vs_exact(memory, queries))
    out.update(_core_vs_raw(memory, {"img": queries, "txt": texts}, 16, cfg.neighbours.search_margin))
    raw_two = 1.0 / (1.0 / _qps(lambda: memory.indices["img"].search(queries, 16), len(queries))
                     + 1.0 / _qps(lambda: memory.indices["txt"].search(texts, 16), len(texts)))
    out["raw_faiss_pairs_per_s_two_searches"] = round(raw_two, 1)
    for n_train in n_train_sizes:
        # keep only the first n_train pairs: rewrite the train split
        ri, rt, _, _ = clustered_pairs(n_train, dim, len(centers[0]), seed=2, centers=centers)
        write_embedded(cfg.paths.embedded("train"), ri, rt, shard_size=2500)
        out[f"beam_pass_{n_train}"] = _beam_pass(cfg, n_train, raw_two)
    return out


def bench_index(out_dir: str | Path, quick: bool = True) -> dict:
    """Run the benchmark in ``out_dir`` (work folders are kept there); returns the figures."""
    out_dir = Path(out_dir)
    results = {"note": "2 shared CPU cores: timings are noisy",
               "d64": _one(out_dir / "d64", 200_000, 64, (5000, 20000) if quick else (10000, 40000))}
    if not quick:
        results["d512"] = _one(out_dir / "d512", 200_000, 512, (10000,))
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return results
