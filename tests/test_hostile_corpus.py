"""embed-memory (real Beam DirectRunner + img2dataset over loopback + open_clip) on a hostile URL
list made from the generated world (reco.world.hostile): >= 20% of rows dead, slow, looping,
not images, truncated, decompression bombs, oversized, bad schemes, malformed, empty; duplicate
URLs; empty, 10k-character, non-UTF-8 and CSV-quoting captions. The rules checked here are the
ones RELIABILITY.md states."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.clip import resolve_model_spec
from reco.formats import STATUS_OK, STATUSES, Manifest, decode_vectors
from reco.embedded import read_table as read_embedded
from reco.world.build import base_url
from reco.world.hostile import BAD_CAPTIONS, KINDS, write_hostile_urls

SLOW = 5.0          # the slow endpoint's delay, beyond the 2 s timeout below


@pytest.fixture(scope="module")
def hostile_run(tiny_world, tmp_path_factory):
    from reco.pipelines.embed_memory import embed_urls

    cfg = tiny_world
    out = tmp_path_factory.mktemp("hostile")
    corpus = write_hostile_urls(cfg.paths.world, out / "urls.csv", base_url=base_url(cfg.world),
                                n_good=150, hostile_rate=0.25, slow_seconds=SLOW)
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    embed_cfg = dataclasses.replace(cfg.embed, shard_size=64, batch_size=64, timeout=2, retries=0,
                                    threads=16, torch_threads=1, allow_networks=("127.0.0.0/8",))
    run = dict(model=model, pretrained=pretrained, embed_cfg=embed_cfg)
    manifest, info = embed_urls(str(corpus.path), str(out / "embedded"), **run)
    table = pa.concat_tables([read_embedded(p) for p in manifest.shard_paths(out / "embedded")])
    return corpus, manifest, info, table, (str(corpus.path), str(out / "embedded"), run)


def test_corpus_is_hostile_enough(hostile_run):
    corpus = hostile_run[0]
    assert len(corpus.hostile) >= 0.2 * corpus.rows
    assert set(corpus.hostile.values()) == set(KINDS)            # every kind occurs
    assert corpus.duplicates and set(corpus.captions.values()) == set(BAD_CAPTIONS)
    raw = corpus.path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")                                      # the list really holds bad bytes


def test_run_completes_and_every_row_is_accounted_for(hostile_run):
    corpus, manifest, info, table, _ = hostile_run
    assert info["complete"] and len(manifest.shards) == info["shards"] == -(-corpus.rows // 64)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(corpus.rows))               # no row lost, none twice
    assert sum(manifest.counts.values()) == corpus.rows
    assert set(table.column("status").to_pylist()) <= set(STATUSES)


def test_every_failure_is_recorded_with_its_reason(hostile_run):
    corpus, _, _, table, _ = hostile_run
    rows = {r["id"]: r for r in table.select(["id", "status", "error_message"]).to_pylist()}
    wrong = []
    for i, kind in corpus.hostile.items():
        want, row = KINDS[kind], rows[i]
        if row["status"] != want.status or want.message.lower() not in (row["error_message"] or "").lower():
            wrong.append((kind, row["status"], row["error_message"]))
    assert not wrong, wrong
    failed = [r for r in rows.values() if r["status"] != STATUS_OK]
    assert all(r["error_message"] for r in failed)


def test_every_good_sample_is_embedded_exactly_once(hostile_run):
    corpus, manifest, info, table, _ = hostile_run
    ok = table.filter(pa.compute.equal(table.column("status"), STATUS_OK))
    ok_ids = ok.column("id").to_pylist()
    assert Counter(ok_ids) == Counter(corpus.good)               # exactly the good rows, once each
    assert manifest.counts[STATUS_OK] == info["metrics"]["embedded"] == len(corpus.good)
    dim = manifest.info["dim"]
    for name in ("image_emb", "text_emb"):
        emb = decode_vectors(ok.column(name), dim)
        assert np.isfinite(emb).all() and np.allclose((emb ** 2).sum(axis=1), 1, atol=1e-2)


def test_duplicate_urls_are_separate_samples_with_the_same_image(hostile_run):
    corpus, manifest, _, table, _ = hostile_run
    by_id = {r["id"]: r for r in table.select(["id", "url", "status", "image_emb"]).to_pylist()}
    for dup, first in corpus.duplicates.items():
        a, b = by_id[dup], by_id[first]
        assert a["url"] == b["url"] and a["status"] == b["status"] == STATUS_OK
        emb_a, emb_b = (np.frombuffer(r["image_emb"], "<f2").astype(np.float32) for r in (a, b))
        assert emb_a.shape == (manifest.info["dim"],) and np.allclose(emb_a, emb_b, atol=1e-3)


def test_bad_captions_are_kept_and_embedded(hostile_run):
    corpus, _, _, table, _ = hostile_run
    by_id = {r["id"]: r for r in table.select(["id", "caption", "status"]).to_pylist()}
    for i, kind in corpus.captions.items():
        assert by_id[i]["status"] == STATUS_OK, kind
        assert by_id[i]["caption"] == corpus.expected_caption(kind), kind
    assert "\ufffd" in by_id[next(i for i, k in corpus.captions.items() if k == "non_utf8")]["caption"]
    assert len(by_id[next(i for i, k in corpus.captions.items() if k == "long")]["caption"]) == 10_000


def test_rerun_adds_nothing(hostile_run):
    from reco.pipelines.embed_memory import embed_urls

    corpus, manifest, _, table, (urls, out, run) = hostile_run
    before = {p: pq.read_metadata(p).num_rows for p in manifest.shard_paths(out)}
    again, info = embed_urls(urls, out, **run)
    assert info["shards_run"] == 0 and info["complete"]
    assert again.counts == manifest.counts
    assert {p: pq.read_metadata(p).num_rows for p in again.shard_paths(out)} == before
    assert isinstance(Manifest.read(out, kind="embedded"), Manifest)
