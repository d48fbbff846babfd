"""A memory index built by autofaiss on Spark, for memories too large for one machine.

autofaiss's ``build_index(..., distributed="pyspark")`` trains the index on a sample (driver),
then every Spark task adds one slice of the embeddings (``add_with_ids`` with the global row
number, so positions are the row order of the Parquet files) and writes a small index; the small
indices are merged (into ``nb_indices_to_keep`` indices). Inputs are Parquet files with one
``embedding`` column (list<float32>) and an ``id`` column, written by :func:`stage_embeddings`
from reco's embedded shards (unit-norm vectors, success rows, manifest order).

Only indices that ``faiss.merge_into`` can merge qualify: IVF with Flat or PQ codes (not the
re-ranked ``RFlat`` keys of :mod:`reco.index.keys`; the neighbour pass can re-rank the shortlist
with the memory's stored embeddings). :func:`distributed_key` picks ``IVF{nlist},PQ{m}``.

On a cluster, give ``build_distributed`` the cluster's SparkSession (paths on a shared
filesystem: hdfs://, s3://, gs://); :func:`local_spark` starts a local one on 127.0.0.1 with
the UI off and no package downloads (tests, small corpora).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from reco.embedded import open_split, read_shard
from reco.errors import ConfigError
from reco.formats import atomic_save_npy, atomic_write_table, atomic_write_text
from reco.index.build import normalise
from reco.index.keys import _pq_m, choose_nlist

log = logging.getLogger(__name__)
MODALITY_COLUMNS = {"img": "image", "txt": "text"}


@contextlib.contextmanager
def local_spark(cores: int = 2, memory: str = "2g", tmp_dir: str | None = None):
    """A local SparkSession (``local[cores]``) bound to 127.0.0.1, UI off; stopped on exit."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ConfigError("distributed index building needs pyspark: pip install '.[spark]'") from exc
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    builder = (SparkSession.builder.master(f"local[{cores}]").appName("reco-index")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.memory", memory)
               .config("spark.task.maxFailures", "1"))
    if tmp_dir:
        builder = builder.config("spark.local.dir", str(tmp_dir))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


def stage_embeddings(split_folder: str | Path, out_dir: str | Path,
                     modalities: tuple[str, ...] = ("img", "txt")) -> dict:
    """Embedded shards -> ``out_dir/<modality>/part-NNNNN.parquet`` (``id``, ``embedding``
    list<float32>, unit-norm), one file per input shard, success rows only; also
    ``out_dir/ids.npy`` (positions -> ids). Returns {"n", "dim", "model_id", "files"}."""
    split = open_split(split_folder)
    out = Path(out_dir)
    ids = []
    for i, path in enumerate(split.shards):
        part = read_shard(path, split.dim, modalities=tuple(MODALITY_COLUMNS[m] for m in modalities))
        ids.append(part["id"])
        for m in modalities:
            vectors = normalise(part[MODALITY_COLUMNS[m]])
            table = pa.table({"id": pa.array(part["id"], pa.int64()),
                              "embedding": pa.FixedSizeListArray.from_arrays(
                                  pa.array(vectors.reshape(-1), pa.float32()), split.dim).cast(
                                  pa.list_(pa.float32()))})
            atomic_write_table(table, out / m / f"part-{i:05d}.parquet")
    all_ids = np.concatenate(ids).astype(np.int64)
    atomic_save_npy(all_ids, out / "ids.npy")
    return {"n": int(len(all_ids)), "dim": split.dim, "model_id": split.model_id,
            "files": len(split.shards)}


def distributed_key(n: int, dim: int) -> str:
    """``IVF{nlist},PQ{dim/8}`` (mergeable across Spark tasks; 8-bit PQ codes)."""
    return f"IVF{choose_nlist(n)},PQ{_pq_m(dim, 8)}"


def build_distributed(embeddings_dir: str | Path, index_path: str | Path, *, spark, index_key: str,
                      metric: str = "l2", temporary_dir: str | Path,
                      current_memory_available: str = "4G", max_index_memory_usage: str = "2G",
                      nb_indices_to_keep: int = 1, nb_cores: int | None = None,
                      index_param: str = "nprobe=16") -> dict:
    """autofaiss ``build_index(distributed="pyspark")`` over the Parquet files in
    ``embeddings_dir`` (see :func:`stage_embeddings`), written to ``index_path``.

    Args:
        spark: an active SparkSession (autofaiss uses the active one).
        index_key: faiss factory string of a mergeable index (:func:`distributed_key`).
        metric: "l2" on unit vectors ranks as inner product (as :mod:`reco.index.keys`).
        temporary_dir: folder for the small per-task indices (shared filesystem on a cluster).
        index_param: search parameters set on the result (autofaiss has no tuning heuristics
            for every key; tune nprobe afterwards as ``reco.index.build.tune_search`` does).
        nb_indices_to_keep: > 1 leaves that many indices ``{index_path}1..N`` (memories larger
            than one machine's RAM, searched one after the other).
    Returns:
        info: key, metric, seconds, autofaiss's metrics.
    """
    from autofaiss import build_index

    if spark is None:
        raise ConfigError("build_distributed needs a SparkSession (see local_spark)")
    if not index_key.startswith("IVF") or "Refine" in index_key or "RFlat" in index_key:
        raise ConfigError(f"index_key={index_key!r}: distributed builds merge per-task indices; "
                          "use an IVF key with Flat or PQ codes (distributed_key)")
    index_path = Path(index_path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    infos_path = index_path.with_name(index_path.name + ".autofaiss.json")
    t0 = time.perf_counter()
    _, metrics = build_index(
        embeddings=str(embeddings_dir), file_format="parquet", embedding_column_name="embedding",
        index_path=str(index_path), index_infos_path=str(infos_path), save_on_disk=True,
        index_key=index_key, index_param=index_param, metric_type=metric, distributed="pyspark",
        temporary_indices_folder=str(temporary_dir), nb_indices_to_keep=nb_indices_to_keep,
        current_memory_available=current_memory_available,
        max_index_memory_usage=max_index_memory_usage, nb_cores=nb_cores, verbose=logging.WARNING)
    if nb_indices_to_keep == 1 and not index_path.is_file():
        raise RuntimeError(f"autofaiss wrote no index to {index_path} (see its log above)")
    info = {"key": index_key, "index_param": index_param, "metric": metric, "nb_indices": nb_indices_to_keep,
            "seconds": round(time.perf_counter() - t0, 2), "autofaiss": metrics or {}}
    atomic_write_text(index_path.with_name(index_path.name + ".info.json"),
                      json.dumps(info, indent=2, default=str))
    return info
