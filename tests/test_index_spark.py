"""autofaiss's distributed (pyspark) index build on a local Spark session (issue 8).

A small clustered corpus, written as reco embedded shards, is staged to Parquet and indexed by
autofaiss with ``distributed="pyspark"`` on ``local[2]`` (127.0.0.1, UI off, no downloads): every
vector must be in the merged index at its global row position, and recall@10 against exact
search must be high. Spark start-up and the per-task indices take ~40 s on 2 busy cores.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyspark", reason="pyspark (the spark extra) is not installed")

N, DIM = 3000, 32


@pytest.fixture(scope="module")
def spark_index(tmp_path_factory):
    import faiss

    from reco.index.distributed import build_distributed, local_spark, stage_embeddings
    from reco.index.synthetic import clustered_pairs, write_embedded

    root = tmp_path_factory.mktemp("spark_index")
    img, txt, labels, _ = clustered_pairs(N, DIM, 20, seed=0)
    ids = np.arange(N, dtype=np.int64) + 5000
    write_embedded(root / "memory", img, txt, labels=labels, model="synthetic", shard_size=700, ids=ids)
    staged = stage_embeddings(root / "memory", root / "staged", modalities=("img",))
    with local_spark(cores=2, tmp_dir=root / "spark") as spark:
        info = build_distributed(root / "staged" / "img", root / "index" / "image.index", spark=spark,
                                 index_key="IVF32,Flat", temporary_dir=root / "spark" / "indices")
    return root, staged, info, faiss.read_index(str(root / "index" / "image.index"))


def test_every_vector_indexed_once(spark_index):
    root, staged, info, index = spark_index
    assert staged["n"] == N and staged["files"] == 5
    assert index.ntotal == N
    assert np.array_equal(np.load(root / "staged" / "ids.npy"), np.arange(N) + 5000)
    assert info["key"] == "IVF32,Flat"


def test_recall_against_exact_search(spark_index):
    import faiss
    import pyarrow.parquet as pq

    root, _, _, index = spark_index
    files = sorted((root / "staged" / "img").glob("part-*.parquet"))
    vectors = np.concatenate([np.stack(pq.read_table(f).column("embedding").to_numpy(zero_copy_only=False))
                              for f in files]).astype(np.float32)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    queries = vectors[::10]
    truth = exact.search(queries, 10)[1]
    faiss.extract_index_ivf(index).nprobe = 8
    found = index.search(queries, 10)[1]
    assert np.array_equal(found[:, 0], np.arange(0, N, 10))         # each finds itself: positions
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.95, recall


def test_refine_keys_refused(tmp_path):
    from reco.errors import ConfigError
    from reco.index.distributed import build_distributed

    with pytest.raises(ConfigError, match="IVF key"):
        build_distributed(tmp_path, tmp_path / "x.index", spark=object(),
                          index_key="IVF64,PQ8x4fs,RFlat", temporary_dir=tmp_path)
