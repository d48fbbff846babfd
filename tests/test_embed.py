"""Embed + write transforms and the whole embed-memory job (reco.pipelines.embed_memory).

The end-to-end job runs once per module over a generated corpus served on loopback HTTP with
deliberately broken URLs; the other tests read its output or copy it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from reco import cli
from reco.clip import encode_images, encode_texts, load_clip
from reco.errors import ConfigError, FormatError, MismatchError
from reco.clip import model_identity
from reco.formats import Manifest, check_columns, decode_vectors, embedded_schema
from reco.pipelines.config import EmbedConfig
from reco.pipelines.download import IMAGE_KEY, resizer
from reco.pipelines.embed import EmbedShards
from reco.pipelines.embed_memory import embed_urls, pipeline_options
from reco.pipelines.write import WriteShards, complete_shards, write_manifest

CFG = EmbedConfig(shard_size=8, batch_size=5, timeout=2, threads=8, allow_networks=("127.0.0.0/8",))
ATOL = 2e-3          # fp16 storage of unit vectors


@pytest.fixture(scope="module")
def clip(embed_model):
    return load_clip(embed_model)


@pytest.fixture(scope="module")
def embedded(embed_corpus, embed_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "out"
    manifest, info = embed_urls(str(embed_corpus.urls), str(out), model=embed_model, embed_cfg=CFG)
    return manifest, info, out


def _read(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def _check_schema(got, want):
    check_columns(got, want, "test")        # names and types (list child names may differ)
    assert got.names == want.names and got.metadata == want.metadata


def _expected_image_embedding(clip, path):
    """What open_clip gives on the image that the pipeline's img2dataset resize produces."""
    from PIL import Image

    with open(path, "rb") as f:
        data, *_, err = resizer(clip.image_size, CFG)(io.BytesIO(f.read()), None)
    assert err is None
    return encode_images(clip, clip.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]


def test_end_to_end_rows_statuses_and_manifest(embed_corpus, embedded, embed_model):
    manifest, info, out = embedded
    n = pq.read_metadata(embed_corpus.urls).num_rows
    table = _read(out)
    shards = -(-n // CFG.shard_size)
    assert info["rows"] == n == table.num_rows and info["complete"] and info["shards_run"] == shards
    assert sorted(table.column("id").to_pylist()) == list(range(n))
    # the metadata names what the model is (architecture + weights digest), not its path
    _check_schema(table.schema, embedded_schema(64, *model_identity(embed_model).split("|", 1)))
    status = dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    errors = dict(zip(table.column("id").to_pylist(), table.column("error_message").to_pylist()))
    assert {i: status[i] for i in embed_corpus.expected} == embed_corpus.expected
    assert all(status[i] == "success" and errors[i] is None for i in embed_corpus.good)
    assert all(errors[i] for i in embed_corpus.expected)                     # a reason each
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    assert [labels[i] for i in embed_corpus.good] == [k % 5 for k in range(len(embed_corpus.good))]
    # manifest: complete shards, counts by status, model
    again = Manifest.read(out, kind="embedded")
    assert again.shards == [f"part-{i:05d}.parquet" for i in range(shards)] == manifest.shards
    assert again.counts["success"] == len(embed_corpus.good) == info["metrics"]["embedded"]
    assert sum(again.counts.values()) == n and again.counts["refused"] == 2
    assert again.info["model_id"] == model_identity(embed_model) and again.info["dim"] == 64
    assert info["metrics"]["rows_written"] == n and info["metrics"]["shards_written"] == shards


def test_embeddings_equal_direct_open_clip(embed_corpus, embedded, clip):
    table = _read(embedded[2])
    ids = table.column("id").to_pylist()
    image = decode_vectors(table.column("image_emb"), 64)
    text = decode_vectors(table.column("text_emb"), 64)
    row = {i: k for k, i in enumerate(ids)}
    good = embed_corpus.good
    want_img = torch.stack([_expected_image_embedding(clip, embed_corpus.images[i]) for i in good])
    captions = table.column("caption").to_pylist()
    want_txt = encode_texts(clip, [captions[row[i]] for i in good])
    np.testing.assert_allclose(image[[row[i] for i in good]], want_img.numpy(), atol=ATOL)
    np.testing.assert_allclose(text[[row[i] for i in good]], want_txt.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(image[[row[i] for i in good]], axis=1), 1, atol=ATOL)
    bad = [row[i] for i in embed_corpus.expected]
    assert not image[bad].any() and not text[bad].any()     # no embedding: zero vectors


def test_resume_after_kill_through_the_cli(embed_corpus, embedded, embed_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(embedded[2], out)
    (out / "manifest.json").unlink()
    kept = out / "part-00002.parquet"
    before = kept.stat().st_mtime_ns
    for shard in (1, 3):
        (out / f"part-{shard:05d}.parquet").unlink()                 # killed before these
    (out / ".part-00001.parquet.tmp-deadbeef").write_bytes(b"half-writ")   # killed mid-write
    assert 1 not in complete_shards(str(out)) and 3 not in complete_shards(str(out))
    argv = ["embed-memory", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--model", embed_model,
            "--input", str(embed_corpus.urls), "--output", str(out),
            *[f"--set=embed.{k}={getattr(CFG, k)}" for k in ("shard_size", "timeout")], "--set=embed.allow_networks=127.0.0.0/8",
            "--", "--direct_running_mode=in_memory"]
    assert cli.main(argv) == 0
    table = _read(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == pq.read_metadata(embed_corpus.urls).num_rows
    assert kept.stat().st_mtime_ns == before                             # skipped, not rewritten
    assert Manifest.read(out).counts == embedded[0].counts
    _, info = embed_urls(str(embed_corpus.urls), str(out), model=embed_model, embed_cfg=CFG)
    assert info["shards_run"] == 0 and info["shards_skipped"] == info["shards"] and info["metrics"] == {}


def test_old_format_output_is_refused_then_reembedded_with_force(embed_corpus, embedded, embed_model,
                                                                  tmp_path):
    """Resuming over embedded/1 shards would mix formats: one FormatError naming a shard, with
    the advice; --force (through the CLI) deletes them and embeds everything in embedded/2."""
    from tests.fixtures.old_formats import rewrite_embedded_v1

    out = tmp_path / "out"
    shutil.copytree(embedded[2], out)
    record = json.loads((out / "record.json").read_text())
    assert record["options"]["format"] == "embedded/2" and embedded[0].info["format"] == "embedded/2"
    record["options"]["format"] = "embedded/1"                # as if recorded by the old layout
    (out / "record.json").write_text(json.dumps(record))
    with pytest.raises(MismatchError, match=r"record.json: option\(s\) format \(recorded 'embedded/1', now "
                                            r"'embedded/2'\) .*rerun `reco embed-memory --force`"):
        embed_urls(str(embed_corpus.urls), str(out), model=embed_model, embed_cfg=CFG)
    for path in sorted(out.glob("part-*.parquet")):
        rewrite_embedded_v1(path)                       # as the previous version wrote them
    (out / "part-00001.parquet").unlink()               # and a kill before shard 1
    with pytest.raises(FormatError, match=rf"{out / 'part-00000.parquet'}: embedded shard of format "
                                          rf"embedded/1 .*rerun `reco embed-memory --force`"):
        embed_urls(str(embed_corpus.urls), str(out), model=embed_model, embed_cfg=CFG)
    assert not (out / "part-00001.parquet").exists()     # refused before any work
    argv = ["embed-memory", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--model", embed_model,
            "--input", str(embed_corpus.urls), "--output", str(out), "--force",
            *[f"--set=embed.{k}={getattr(CFG, k)}" for k in ("shard_size", "timeout")], "--set=embed.allow_networks=127.0.0.0/8",
            "--", "--direct_running_mode=in_memory"]
    assert cli.main(argv) == 0
    assert json.loads((out / "record.json").read_text())["options"]["format"] == "embedded/2"
    assert Manifest.read(out).counts == embedded[0].counts
    got, ref = _read(out), _read(embedded[2])
    assert got.schema.metadata[b"reco.format"] == b"embedded/2" and got.num_rows == ref.num_rows
    assert got.column("id").equals(ref.column("id")) and got.column("status").equals(ref.column("status"))
    np.testing.assert_allclose(decode_vectors(got.column("image_emb"), 64),
                               decode_vectors(ref.column("image_emb"), 64), atol=ATOL)


def test_clear_errors_before_any_work(embed_corpus, embedded, embed_model, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(FormatError, match=r"urls\.parquet: missing column\(s\) \['link'\]"):
        embed_urls(str(embed_corpus.urls), str(out), model=embed_model,
                   embed_cfg=dataclasses.replace(CFG, url_col="link"))
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown open_clip model.*ViT-B-32"):
        embed_urls(str(embed_corpus.urls), str(out), model="ViT-B-33", embed_cfg=CFG)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        embed_urls(str(embed_corpus.urls), str(tmp_path / "file" / "out"), model=embed_model,
                   embed_cfg=CFG)
    with pytest.raises(ConfigError, match="multi_threading"):
        pipeline_options(CFG, ["--direct_running_mode=multi_threading"])
    with pytest.raises(MismatchError, match="embedded with model"):
        embed_urls(str(embed_corpus.urls), str(embedded[2]), model="reco-tiny", embed_cfg=CFG)
    with pytest.raises(MismatchError, match=r"option\(s\) embed.shard_size \(recorded 8, now 5\).*--force"):       # resume would mix shards
        embed_urls(str(embed_corpus.urls), str(embedded[2]), model=embed_model,
                   embed_cfg=dataclasses.replace(CFG, shard_size=5))


def _image_bytes(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_embed_transform_batches_and_matches_direct(clip, embed_model):
    from PIL import Image

    rows = [{"id": i, "url": "u", "caption": f"thing {i}", "label": None, "status": "success",
             "error_message": None, IMAGE_KEY: _image_bytes(i)} for i in range(7)]
    rows[3] = {**rows[3], IMAGE_KEY: b"garbage"}
    rows[5] = {**rows[5], "status": "failed_to_download", "error_message": "404"}
    rows[5].pop(IMAGE_KEY)
    good = [0, 1, 2, 4, 6]
    pixels = torch.stack([clip.preprocess(Image.open(io.BytesIO(rows[i][IMAGE_KEY])).convert("RGB"))
                          for i in good])
    want = {i: (v, t) for i, v, t in zip(good, encode_images(clip, pixels).numpy(),
                                         encode_texts(clip, [rows[i]["caption"] for i in good]).numpy())}

    def check(elements):
        (shard, out), = elements
        assert shard == 7 and [r["id"] for r in out] == list(range(7))
        assert all(IMAGE_KEY not in r for r in out)
        assert out[3]["status"] == "failed_to_embed" and "decode" in out[3]["error_message"]
        assert out[5]["status"] == "failed_to_download" and "image_emb" not in out[5]
        for i in good:
            np.testing.assert_allclose(out[i]["image_emb"], want[i][0], atol=1e-5)
            np.testing.assert_allclose(out[i]["text_emb"], want[i][1], atol=1e-5)

    with test_pipeline.TestPipeline(options=pipeline_options(CFG)) as p:
        out = p | beam.Create([(7, rows)]) | EmbedShards(embed_model, None, batch_size=2)
        assert_that(out, check)


def test_write_shards_atomic_fp16_and_manifest(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(3, 64)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    rows = [{"id": 10 + i, "url": f"u{i}", "caption": "c", "label": i, "status": "success",
             "error_message": None, "image_emb": vec[i], "text_emb": -vec[i]} for i in range(3)]
    rows[1] = {**rows[1], "status": "failed_to_download", "error_message": "404",
               "image_emb": None, "text_emb": None, "label": None}
    with test_pipeline.TestPipeline(options=pipeline_options(CFG)) as p:
        counts = p | beam.Create([(4, rows), (0, rows[:1])]) | WriteShards(str(tmp_path), 64, "m", "p")
        assert_that(counts, equal_to([(4, {"success": 2, "failed_to_download": 1}),
                                      (0, {"success": 1})]))
    (tmp_path / ".part-00009.parquet.tmp-0000").write_bytes(b"x")          # an interrupted write
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["part-00000.parquet", "part-00004.parquet"]
    table = pq.read_table(tmp_path / "part-00004.parquet")
    _check_schema(table.schema, embedded_schema(64, "m", "p"))
    assert table.column("label").to_pylist() == [0, None, 2]
    got = decode_vectors(table.column("image_emb"), 64)
    np.testing.assert_allclose(got[[0, 2]], vec[[0, 2]], atol=ATOL)
    assert not got[1].any()
    manifest = write_manifest(str(tmp_path), "m|p", 64)
    assert manifest.shards == ["part-00000.parquet", "part-00004.parquet"]
    assert manifest.counts["success"] == 3 and manifest.info["rows"] == 4
