"""``build_memory_index``: the memory's embedded shards -> one faiss index per modality.

Steps: read the success rows of the memory shards (validated), remove memory items whose image
is a near-duplicate of an evaluation image (``reco.index.dedup``), then for each modality build
the index chosen by ``reco.index.keys`` with autofaiss, tune nprobe (and the re-ranking
shortlist) until recall@``recall_k`` against exact search on a held-out sample reaches
``target_recall``, and write everything atomically (layout: ``reco.index.memory``).

Memory: one modality at a time, its vectors streamed shard by shard to a float32 temporary
(``reco.index.vectors``), trained on autofaiss's sample and added in bounded batches: the peak is
that modality's index plus one batch (1.60x the float32 data at 200k x 512-d with the re-ranked
key, which holds the vectors; 8.51x before, ``python -m reco.bench.index build-memory``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
from autofaiss.utils.cast import cast_memory_to_bytes

from reco.config import RecoConfig
from reco.console import captured_output
from reco.embedded import open_split, read_split
from reco.errors import ConfigError, FormatError, MismatchError
from reco.formats import atomic_save_npy, atomic_write_text, remove_temporaries
from reco.index.config import IndexConfig
from reco.index.dedup import duplicate_mask, reference_index
from reco.index.keys import IndexPlan, choose_index_key
from reco.index.memory import (EMB_FILES, IDS_FILE, INDEX_FILES, INFO_FILE, gpus_for, read_info,
                               set_search_params)
from reco.index.vectors import NpyRows, add_in_batches, exact_knn, scan_split, stage
from reco.record import FILE as RECORD_FILE
from reco.record import Record, StaleError, locked, outputs_of

log = logging.getLogger(__name__)
MODALITY_COLUMNS = {"img": "image", "txt": "text"}


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def train_index(vectors, plan: IndexPlan, cfg: IndexConfig, gpus: int = 0) -> faiss.Index:
    """The index of ``plan`` over ``vectors`` (an array or :class:`reco.index.vectors.NpyRows`;
    nothing written to disk): autofaiss's index and training sample on the CPU, then the vectors
    added one bounded batch at a time; with ``gpus`` (faiss-gpu, ``index.use_gpu``) the IVF
    k-means runs on the GPUs (:func:`train_on_gpus`)."""
    if gpus and not plan.exact:
        return train_on_gpus(vectors, plan)
    return add_in_batches(autofaiss_trained(vectors, plan, cfg), vectors)


def autofaiss_trained(vectors, plan: IndexPlan, cfg: IndexConfig) -> faiss.Index:
    """The empty index of ``plan`` trained as ``autofaiss.build_index`` trains it (its index
    factory, its memory check, its training sample: the first ``get_optimal_train_size`` rows).
    autofaiss's own add would read up to 1 GB batches with up to 50 pieces read ahead."""
    from autofaiss.external.build import estimate_memory_required_for_index_creation
    from autofaiss.indices.training import create_empty_index

    n, dim = vectors.shape
    needed, _ = estimate_memory_required_for_index_creation(n, dim, plan.key, cfg.max_index_memory_usage)
    available, budget = (cast_memory_to_bytes(cfg.current_memory_available),
                         cast_memory_to_bytes(cfg.max_index_memory_usage))
    if needed > available or available - budget < 0.1 * available:
        raise ConfigError(f"index {plan.key} over {n} x {dim} vectors: autofaiss needs {needed} bytes "
                          f"and index.max_index_memory_usage={cfg.max_index_memory_usage} under "
                          f"90% of index.current_memory_available={cfg.current_memory_available}; "
                          f"raise index.current_memory_available (or lower the budget)")
    faiss.omp_set_num_threads(cfg.nb_cores or multiprocessing.cpu_count())
    index = create_empty_index(dim, plan.key, plan.metric)
    size = train_rows(n, dim, plan.key, cfg)
    if size is not None:
        index.train(np.ascontiguousarray(vectors[:size], dtype=np.float32))
    return index


def train_rows(n: int, dim: int, key: str, cfg: IndexConfig) -> int | None:
    """Rows of autofaiss's training sample for ``key`` over ``n`` x ``dim`` vectors (None: the
    key needs no training). ``index.current_memory_available`` caps it, so it is recorded in
    info.json and checked before an index is reused (:func:`check_train_rows`)."""
    from autofaiss.external.optimize import check_if_index_needs_training, get_optimal_train_size

    if not check_if_index_needs_training(key):
        return None
    return int(get_optimal_train_size(n, key, cfg.current_memory_available, dim))


def check_train_rows(out: Path, info: dict, cfg: IndexConfig) -> None:
    """StaleError when the index in ``out`` was trained on another sample than
    ``index.current_memory_available`` now gives (an option the run record leaves out because it
    changes the index only when the cap binds)."""
    n, dim = info.get("n"), info.get("dim")
    for m, meta in info.get("indices", {}).items():
        if (not isinstance(meta, dict) or meta.get("trained_on_gpus") or not isinstance(n, int)
                or not isinstance(dim, int) or not isinstance(meta.get("train_rows"), int)):
            continue                      # GPU-trained, or an info.json from before this check
        now = train_rows(n, dim, str(meta.get("key")), cfg)
        if now != meta["train_rows"]:
            raise StaleError(f"{out / INDEX_FILES[m]}: trained on {meta['train_rows']} rows; "
                             f"index.current_memory_available={cfg.current_memory_available} gives "
                             f"{now}: rerun build-index with --force (or the option it was built with)")


GPU_TRAIN_POINTS = 256        # training vectors per inverted list (faiss warns below 39)


def train_on_gpus(vectors, plan: IndexPlan) -> faiss.Index:
    """faiss's recipe for GPU training: the CPU index of ``plan.key`` whose coarse k-means
    assigns on the GPUs (``clustering_index``), trained on a sample, then filled. The index
    stays a CPU index (written to disk as any other; ``Memory.load(use_gpu=True)`` moves it)."""
    metric = faiss.METRIC_INNER_PRODUCT if plan.metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(vectors.shape[1], plan.key, metric)
    ivf = faiss.extract_index_ivf(index)
    gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(vectors.shape[1]))
    ivf.clustering_index = gpu_flat        # (a borrowed pointer: gpu_flat lives until training ends)
    rng = np.random.default_rng(0)
    n_train = min(len(vectors), max(ivf.nlist * GPU_TRAIN_POINTS, 1))
    sample = np.ascontiguousarray(vectors[np.sort(rng.choice(len(vectors), n_train, replace=False))],
                                  dtype=np.float32)
    index.train(sample)
    ivf.clustering_index = None
    del gpu_flat, sample
    return add_in_batches(index, vectors)


def _leave_one_out(labels: np.ndarray, sample: np.ndarray, k: int) -> np.ndarray:
    """Drop each query's own position from its hit list and keep the first k."""
    out = np.full((len(labels), k), -1, dtype=np.int64)
    for i, row in enumerate(labels):
        row = row[row != sample[i]][:k]
        out[i, :len(row)] = row
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max((t >= 0).sum(), 1) for f, t in zip(found, truth)]
    return float(np.mean(hits))


# largest re-ranking shortlist tried (x k): hard data (clusters of ~1000 near items) needs ~128-256
MAX_K_FACTOR = 512


def tune_search(index: faiss.Index, vectors, plan: IndexPlan, cfg: IndexConfig) -> dict:
    """Smallest nprobe (then larger re-ranking shortlists) reaching ``cfg.target_recall``.

    nprobe doubles until recall reaches the target or stops improving (then the codes, not the
    probed lists, are the limit, and the re-ranking shortlist ``k_factor`` doubles).

    Recall is measured leave-one-out: ``recall_sample`` memory vectors query the index and their
    ``recall_k`` nearest OTHER items are compared with exact inner-product search.
    """
    if plan.exact:
        return {"nprobe": None, "k_factor": None, "recall": 1.0, "recall_curve": []}
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(vectors), min(cfg.recall_sample, len(vectors)), replace=False)
    queries, k = np.ascontiguousarray(vectors[sample], dtype=np.float32), cfg.recall_k
    truth = _leave_one_out(exact_knn(vectors, queries, k + 1)[1], sample, k)
    nlist = faiss.extract_index_ivf(index).nlist
    top = min(nlist, cfg.max_nprobe)
    nprobes = [p for p in (2 ** i for i in range(20)) if min(cfg.min_nprobe, top) <= p <= top]
    k_factors = ([cfg.refine_k_factor * 2 ** i for i in range(12) if cfg.refine_k_factor * 2 ** i <= MAX_K_FACTOR]
                 if isinstance(index, faiss.IndexRefine) else [None])
    curve, best = [], None
    for k_factor in k_factors:
        previous = -1.0
        for nprobe in nprobes:
            set_search_params(index, nprobe, k_factor)
            t0 = time.perf_counter()
            found = _leave_one_out(index.search(queries, k + 1)[1], sample, k)
            qps = len(queries) / max(time.perf_counter() - t0, 1e-9)
            point = {"nprobe": nprobe, "k_factor": k_factor, "recall": round(recall_at_k(found, truth), 4),
                     "qps": round(qps, 1)}
            curve.append(point)
            if best is None or point["recall"] > best["recall"]:
                best = point
            if point["recall"] >= cfg.target_recall:
                set_search_params(index, nprobe, k_factor)
                return {**point, "recall_curve": curve}
            if point["recall"] - previous < 0.002:   # plateau: the shortlist is the limit
                break
            previous = point["recall"]
    set_search_params(index, best["nprobe"], best["k_factor"])
    return check_recall({**best, "recall_curve": curve}, plan.key, cfg)


def check_recall(tuned: dict, key: str, cfg: IndexConfig) -> dict:
    """``tuned`` when its recall reaches ``cfg.target_recall`` (or ``cfg.allow_low_recall``:
    then a warning); otherwise a ConfigError naming the key, the recall reached and the target."""
    if tuned["recall"] is None or tuned["recall"] >= cfg.target_recall:
        return tuned
    where = f"nprobe={tuned.get('nprobe')}" + (f", k_factor={tuned['k_factor']}" if tuned.get("k_factor") else "")
    what = (f"index {key}: recall@{cfg.recall_k} {tuned['recall']:.3f} is below "
            f"index.target_recall={cfg.target_recall} (best reached, at {where})")
    if cfg.allow_low_recall:
        log.warning("%s; kept because index.allow_low_recall=true", what)
        return tuned
    raise ConfigError(f"{what}; choose another index.index_key, raise index.max_index_memory_usage "
                      f"(larger codes), lower index.target_recall, or set index.allow_low_recall=true "
                      f"to keep this index")


def _temporary(out: Path, name: str) -> Path:
    """A temporary name beside ``out / name`` (``reco.storage.remove_temporaries`` drops it)."""
    return out / f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def _build_modality(split, m: str, keep: np.ndarray, ids: np.ndarray, out: Path, cfg: IndexConfig,
                    staged: list[Path]) -> dict:
    """One modality's index and float16 embeddings, on temporary names in ``out`` (appended to
    ``staged``): its kept vectors streamed to a float32 temporary (``reco.index.vectors.stage``)
    that the index is trained and filled from in bounded batches, then deleted."""
    f32, f16, index_tmp = (_temporary(out, name) for name in (f"{EMB_FILES[m]}.f32", EMB_FILES[m],
                                                               INDEX_FILES[m]))
    staged += [f32, f16, index_tmp]
    stage(split, MODALITY_COLUMNS[m], keep, ids, f32, f16)
    index, info = build_one(NpyRows(f32), INDEX_FILES[m], cfg)
    f32.unlink()
    faiss.write_index(index, str(index_tmp))
    return {"index": index_tmp, "emb": f16, "info": {**info, "size_bytes": index_tmp.stat().st_size}}


def _commit(out: Path, built: dict) -> dict:
    """Rename the built files into place; returns each modality's index info."""
    # info.json (written last) marks a complete folder: withdraw it before replacing any file, so
    # that a run killed mid-rebuild leaves a folder that readers and reruns see as unbuilt, never
    # an old info.json over a mix of old and new files. Only now, with the new indices built: a
    # run that fails before this point leaves the previous index whole.
    (out / INFO_FILE).unlink(missing_ok=True)
    (out / RECORD_FILE).unlink(missing_ok=True)
    for m, files in built.items():
        os.replace(files["index"], out / INDEX_FILES[m])
        os.replace(files["emb"], out / EMB_FILES[m])
    return {m: files["info"] for m, files in built.items()}


def build_one(vectors, name: str, cfg: IndexConfig) -> tuple[faiss.Index, dict]:
    """Build and tune one modality's index in memory (nothing written); returns it and its info."""
    gpus = gpus_for(cfg.use_gpu)
    plan = choose_index_key(len(vectors), vectors.shape[1], cfg, gpu=gpus > 0)
    t0 = time.perf_counter()
    with captured_output(log):            # autofaiss's and embedding-reader's bars: to the log
        index = train_index(vectors, plan, cfg, gpus)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = tune_search(index, vectors, plan, cfg)
    log.debug("%s: %s nprobe=%s recall@%d=%.3f (%.1fs)", name, plan.key, tuned["nprobe"],
              cfg.recall_k, tuned["recall"], build_s)
    rows = None if gpus else train_rows(len(vectors), vectors.shape[1], plan.key, cfg)
    return index, {"key": plan.key, "metric": plan.metric, "reason": plan.reason, "train_rows": rows, **tuned,
                   "recall_k": cfg.recall_k, "build_seconds": round(build_s, 2),
                   "tune_seconds": round(time.perf_counter() - t0, 2),
                   "estimated_bytes": plan.estimated_bytes, "trained_on_gpus": gpus}


def source_fingerprint(cfg: RecoConfig) -> str:
    """What the index depends on: the memory/test manifests and the options used."""
    parts = [json.dumps(cfg.index.__dict__, sort_keys=True, default=str),
             str(cfg.neighbours.eval_dedup_threshold)]
    for split in ("memory", "test"):
        manifest = cfg.paths.embedded(split) / "manifest.json"
        parts.append(manifest.read_text() if manifest.exists() else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _eval_images(cfg: RecoConfig, model_id: str, dim: int) -> np.ndarray | None:
    folder = cfg.paths.embedded("test")
    if not (folder / "manifest.json").exists():
        log.info("no evaluation embeddings in %s: memory not cleaned of eval duplicates", folder)
        return None
    split = open_split(folder, allow_empty=True)
    if split is None:
        return None
    if split.model_id and model_id and split.model_id != model_id:
        raise MismatchError(f"{folder}: test embeddings from model {split.model_id!r}, memory "
                            f"embeddings from model {model_id!r}")
    if split.dim != dim:
        raise MismatchError(f"{folder}: test embeddings of dimension {split.dim}, memory {dim}")
    return normalise(read_split(split, modalities=("image",))["image"])


def _scan(cfg: RecoConfig, split) -> tuple[np.ndarray, np.ndarray, dict]:
    """(success ids, mask of those kept, memory-cleaning info): every memory shard read and
    validated once, each image compared with the evaluation images (``reco.index.dedup``)."""
    evals = _eval_images(cfg, split.model_id, split.dim)
    n_eval = 0 if evals is None else len(evals)
    ids, best = scan_split(split, reference_index(evals) if n_eval else None)
    remove, info = duplicate_mask(best, len(ids), cfg.neighbours.eval_dedup_threshold, n_eval)
    return ids, ~remove, info


# IndexConfig options that do not change the index (where and how fast it is built/read)
# (allow_low_recall: the index is the same; a reused one is checked against the target again)
NOT_SHAPING = ("use_gpu", "mmap", "nb_cores", "current_memory_available", "allow_low_recall")


def index_plan(cfg: RecoConfig, split, test) -> Record:
    """What an index folder's record holds: shaping options, the memory and test splits'
    digests, the model."""
    from reco.record import options_of

    options = {**options_of("index", cfg.index, NOT_SHAPING),
               "neighbours.eval_dedup_threshold": cfg.neighbours.eval_dedup_threshold}
    return Record(stage="index", options=options, model_id=split.model_id,
                  inputs={"memory": split.digest, "test": test.digest if test else "none"})


def _previous(out: Path, planned: Record) -> dict | None:
    """info.json of the index already in ``out`` when it can be reused: recorded with the same
    options and inputs (other ones: refused, naming them), complete, and its files as written.
    The folder's own files unreadable or changed: None (rebuilt, with a warning naming them)."""
    try:
        record = Record.read(out, "index")
    except FormatError as exc:
        log.warning("%s; rebuilding the index", exc)
        return None
    if record is None:
        return None
    record.check_same(out, options=planned.options, inputs=planned.inputs,
                      model_id=planned.model_id, command="build-index")
    if not record.complete or not (out / INFO_FILE).exists():
        return None
    try:
        record.verify(out, command="build-index")
        return read_info(out)
    except FormatError as exc:
        log.warning("%s; rebuilding the index", exc)
        return None


def build_memory_index(cfg: RecoConfig, force: bool = False) -> dict:
    """Build ``cfg.paths.index`` from ``cfg.paths.embedded("memory")``; returns info.json's dict.

    Args:
        cfg: run configuration (``cfg.index``, ``cfg.neighbours.eval_dedup_threshold``).
        force: rebuild even when the folder already holds an index; needed when it was built
            with other options or inputs (refused otherwise, naming them).

    The folder's run record (``record.json``) holds the options, the digests of the memory and
    test splits (whose shards are checked against their own records first) and of every file
    written: an index whose files changed since, or whose inputs changed, is never reused.
    """
    with locked(cfg.paths.index, "build-index"):
        return _build(cfg, force)


def _build(cfg: RecoConfig, force: bool) -> dict:
    out = cfg.paths.index
    split = open_split(cfg.paths.embedded("memory"))            # checked against its record
    test = (open_split(cfg.paths.embedded("test"), allow_empty=True)
            if (cfg.paths.embedded("test") / "manifest.json").exists() else None)
    planned = index_plan(cfg, split, test)
    previous = None if force else _previous(out, planned)
    if previous is not None:
        check_train_rows(out, previous, cfg.index)
        for m, meta in previous.get("indices", {}).items():
            check_recall({"recall": meta.get("recall"), "nprobe": meta.get("nprobe"),
                          "k_factor": meta.get("k_factor")}, f"{meta.get('key')} ({out / INDEX_FILES[m]})",
                         cfg.index)
        log.info("index in %s is up to date; skipping (--force rebuilds)", out)
        return {**previous, "skipped": True}
    t_start = time.perf_counter()
    ids, keep, dedup_info = _scan(cfg, split)
    remove_temporaries(out)                   # left by a killed run
    staged: list[Path] = []                   # this run's temporaries (removed unless renamed)
    try:
        built = {m: _build_modality(split, m, keep, ids, out, cfg.index, staged) for m in INDEX_FILES}
        indices = _commit(out, built)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    kept = ids[keep]
    atomic_save_npy(kept.astype(np.int64), out / IDS_FILE)
    info = {"model_id": split.model_id, "dim": split.dim, "n": int(len(kept)),
            "n_memory_success": int(len(ids)), **dedup_info,
            "keys": {m: i["key"] for m, i in indices.items()},
            "nprobe": {m: i["nprobe"] for m, i in indices.items()},
            "recall": {m: i["recall"] for m, i in indices.items()},
            "indices": indices, "metric_note": "scores are inner products of L2-normalised vectors",
            "fingerprint": source_fingerprint(cfg), "seconds": round(time.perf_counter() - t_start, 2)}
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    files = [*INDEX_FILES.values(), *EMB_FILES.values(), IDS_FILE, INFO_FILE]
    planned.outputs = outputs_of(out, files)
    planned.counts, planned.complete = {"n": int(len(kept))}, True
    planned.write(out)
    return info
