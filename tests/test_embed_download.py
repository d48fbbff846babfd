"""Download + resize with img2dataset over loopback HTTP (reco.pipelines.download)."""
from __future__ import annotations

import dataclasses
import io

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from reco.formats import STATUSES
from reco.pipelines.config import EmbedConfig
from reco.pipelines.download import IMAGE_KEY, DownloadShards, fetch_shard
from reco.pipelines.embed_memory import pipeline_options
from reco.pipelines.urls import FilterUnsafeUrls

CFG = EmbedConfig(timeout=2, threads=8, allow_networks=("127.0.0.0/8",))
SIZE = 32


def _rows(corpus):
    table = pq.read_table(corpus.urls).to_pylist()
    return [{"id": i, **r, "status": None, "error_message": None} for i, r in enumerate(table)]


def _summary(element):
    shard, rows = element
    return shard, sorted((r["id"], r["status"], IMAGE_KEY in r) for r in rows)


def test_download_transform_statuses(embed_corpus):
    rows = _rows(embed_corpus)
    half = len(rows) // 2
    expected = {i: embed_corpus.expected.get(i, "success") for i in range(len(rows))}
    want = [(0, sorted((i, expected[i], expected[i] == "success") for i in range(half))),
            (1, sorted((i, expected[i], expected[i] == "success") for i in range(half, len(rows))))]

    base, good = embed_corpus.server.base_url, list(embed_corpus.good)   # plain values: picklable

    def check_messages(elements):
        msgs = {r["id"]: r["error_message"] for _, rows_ in elements for r in rows_}
        by_url = {r["url"]: msgs[r["id"]] for r in rows}
        assert "404" in by_url[f"{base}good/missing.png"]
        assert "500" in by_url[f"{base}_hostile/500/x.png"]
        assert "timed out" in by_url[f"{base}_hostile/slow/x.png?s=4"]
        assert "CV_IO_MAX_IMAGE_PIXELS" in by_url[f"{base}_hostile/bomb/x.png"]
        assert "refused" in by_url["http://127.0.0.1:1/refused.png"].lower()
        assert "scheme 'ftp'" in by_url["ftp://127.0.0.1/x.png"]
        assert "decod" in by_url[f"{base}_hostile/garbage/x.png"].lower()
        assert all(r["status"] in STATUSES for _, rows_ in elements for r in rows_)
        assert all(msgs[i] is None for i in good)

    with test_pipeline.TestPipeline(options=pipeline_options(CFG)) as p:
        fetched = (p | beam.Create([(0, rows[:half]), (1, rows[half:])])
                   | FilterUnsafeUrls(CFG.allow_networks) | DownloadShards(SIZE, CFG))
        assert_that(fetched | beam.Map(_summary), equal_to(want), label="Statuses")
        assert_that(fetched, check_messages, label="Messages")


def test_fetch_shard_resizes_and_keeps_marked_rows(embed_corpus):
    from PIL import Image

    rows = [r for r in _rows(embed_corpus) if r["id"] in embed_corpus.good][:3]
    rows[2] = {**rows[2], "status": "refused", "error_message": "test"}
    out = fetch_shard(rows, SIZE, dataclasses.replace(CFG, resize_mode="center_crop"))
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out[2] == rows[2]                              # already marked: not fetched
    for r in out[:2]:
        img = Image.open(io.BytesIO(r[IMAGE_KEY]))
        assert img.format == "PNG" and img.size == (SIZE, SIZE)
    assert fetch_shard(rows[2:], SIZE, CFG) == rows[2:]  # nothing to fetch: no img2dataset run


@pytest.mark.slow
def test_fetch_shard_with_img2dataset_process_pool(embed_corpus):
    """processes > 1 goes through img2dataset.download (spawned pool; main thread only)."""
    rows = _rows(embed_corpus)[:8]
    out = fetch_shard(rows, SIZE, dataclasses.replace(CFG, processes=2))
    assert [r["status"] for r in out] == [embed_corpus.expected.get(r["id"], "success") for r in rows]
