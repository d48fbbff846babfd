"""Foreign data: img2dataset outputs (webdataset tars, parquet with image bytes) through
``embed-memory`` and clip-retrieval embedding releases through ``import-embeddings``.

The tiny world is exported into each format (tests/foreign.py); the readers then run in a
process that never imports ``reco.world``, and their output is compared with the world path's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from reco.clip import model_identity

from reco.formats import Manifest, decode_vectors
from tests.fixtures.embed import make_images
from tests.foreign import run_reco, world_samples, write_parquet_images, write_release, write_webdataset

WORLD_ROWS = 240          # rows of the world's memory split exported as img2dataset output


def read_folder(folder: Path) -> dict:
    """Every row of an embedded folder, by id: (url, caption, status, error, key, image, text)."""
    manifest = Manifest.read(folder, kind="embedded")
    dim = manifest.info["dim"]
    out = {}
    for path in manifest.shard_paths(folder):
        t = pq.read_table(path)
        img, txt = (decode_vectors(t.column(c), dim) for c in ("image_emb", "text_emb"))
        keys = t.column("key").to_pylist() if "key" in t.column_names else [None] * t.num_rows
        for j, rec in enumerate(t.select(["id", "url", "caption", "status", "error_message"]).to_pylist()):
            out[rec["id"]] = {**rec, "key": keys[j], "image": img[j], "text": txt[j]}
    return out


# ---------------------------------------------------------------------------------------------
# the tiny world exported: same embeddings as the world path, no world code on the path
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_exports(tiny_embedded, tmp_path_factory):
    """The world's memory split as img2dataset webdataset + parquet output (first rows) and as a
    clip-retrieval release (all success rows, 3 parts), read back with the README commands."""
    cfg = tiny_embedded
    root = tmp_path_factory.mktemp("foreign_world")
    samples = world_samples(cfg, "memory")[:WORLD_ROWS]
    write_webdataset(samples, root / "wds", 100)
    write_parquet_images(samples, root / "pq", 100)
    n = write_release(cfg.paths.embedded("memory"), root / "release", 3)
    model = f"local-dir:{cfg.paths.base_clip}"
    common = ["--preset", "tiny", "--workdir", str(root / "run"), "--model", model]
    ran = run_reco([["embed-memory", *common, "--input", str(root / "wds"), "--output", str(root / "out-wds")],
                    ["embed-memory", *common, "--input", str(root / "pq"), "--output", str(root / "out-pq")],
                    ["import-embeddings", *common, "--input", str(root / "release")]], root)
    return cfg, root, samples, n, ran


def test_foreign_readers_never_import_the_world(world_exports):
    assert world_exports[4]["world_modules"] == []


def test_img2dataset_outputs_embed_like_the_world_path(world_exports):
    cfg, root, samples, _, _ = world_exports
    world = read_folder(cfg.paths.embedded("memory"))
    for name in ("out-wds", "out-pq"):
        got = read_folder(root / name)
        assert sorted(got) == list(range(WORLD_ROWS)), name          # one row per exported row
        for i, s in enumerate(samples):
            row, ref = got[i], world[i]
            assert (row["url"], row["caption"], row["key"]) == (s["url"], s["caption"], s["key"])
            if s["image"] is None:                                    # dead link in the world
                assert row["status"] == "failed_to_download" and row["error_message"] == "404 Not Found"
                continue
            assert row["status"] == ref["status"] == "success", (name, i)
            np.testing.assert_allclose(row["image"], ref["image"], atol=2e-3)
            np.testing.assert_allclose(row["text"], ref["text"], atol=2e-3)


def test_released_embeddings_import_to_the_same_memory(world_exports):
    cfg, root, _, n, ran = world_exports
    world = [r for _, r in sorted(read_folder(cfg.paths.embedded("memory")).items())
             if r["status"] == "success"]
    got = read_folder(root / "run" / "embeddings" / "memory")
    assert len(got) == len(world) == n
    for i, ref in enumerate(world):
        assert (got[i]["url"], got[i]["caption"], got[i]["status"]) == (ref["url"], ref["caption"], "success")
        np.testing.assert_array_equal(got[i]["image"], ref["image"])
        np.testing.assert_array_equal(got[i]["text"], ref["text"])
    manifest = Manifest.read(root / "run" / "embeddings" / "memory", kind="embedded")
    assert manifest.info["model_id"] == model_identity(f"local-dir:{cfg.paths.base_clip}")   # weights digest
    assert manifest.info["normalised"] == {"image": 0, "text": 0}
    assert manifest.counts["success"] == n and "\n  imported " in ran["stdout"]   # the summary


# ---------------------------------------------------------------------------------------------
# corrupt members: recorded per row, the job goes on
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_samples(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("foreign_small")
    names = make_images(root / "imgs", 14)
    samples = [{"key": f"{i:09d}", "url": f"https://example.com/{n}", "caption": f"thing {i}",
                "image": (root / "imgs" / n).read_bytes(), "status": "success", "error_message": None}
               for i, n in enumerate(names)]
    samples[2].update(image=None, status="failed_to_download", error_message="HTTP 404")
    samples[4]["image"] = b"\x89PNG\r\n\x1a\n not an image"                 # undecodable
    samples[11]["image"] = _bomb()
    return samples


def _bomb() -> bytes:
    """A small PNG of 10000 x 7000 pixels (more than the decoder's 64 M pixel limit)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10000, 7000)).save(buf, format="PNG")
    return buf.getvalue()


def _embed(inputs, out: Path, model: str, **cfg):
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import embed_urls

    return embed_urls(str(inputs), str(out), model=model,
                      embed_cfg=EmbedConfig(shard_size=5, batch_size=4, **cfg))


@pytest.mark.parametrize("sidecar", [True, False])
def test_corrupt_tar_members_are_recorded_per_row(small_samples, embed_model, tmp_path, sidecar):
    write_webdataset(small_samples, tmp_path / "wds", 7, sidecar=sidecar,
                     drop={"000000006": "txt", "000000009": "png"})
    manifest, info = _embed(tmp_path / "wds", tmp_path / "out", embed_model)
    rows = read_folder(tmp_path / "out")
    tar0 = str(tmp_path / "wds" / "00000.tar")
    assert info["shards"] == 2 and manifest.info["input_format"] == "webdataset"
    # without the sidecar, the failed download is not in the tar: 13 rows in tar order
    assert len(rows) == (14 if sidecar else 13)
    by_key = {r["key"]: r for r in rows.values()}
    assert by_key["000000004"]["status"] == "failed_to_embed"
    assert by_key["000000004"]["error_message"].startswith(f"{tar0}: sample '000000004': cannot decode")
    assert by_key["000000006"]["status"] == "failed_to_embed"
    assert "no caption member (000000006.txt)" in by_key["000000006"]["error_message"]
    assert "no image member" in by_key["000000009"]["error_message"]
    assert "larger than 64000000 pixels" in by_key["000000011"]["error_message"]
    if sidecar:
        assert by_key["000000002"]["status"] == "failed_to_download"
    ok = [r for r in rows.values() if r["status"] == "success"]
    assert len(ok) == 9 and all(abs(np.linalg.norm(r["image"]) - 1) < 1e-2 for r in ok)


def test_truncated_tar(small_samples, embed_model, tmp_path):
    from reco.errors import FormatError

    tars = write_webdataset(small_samples, tmp_path / "wds", 14)
    data = tars[0].read_bytes()
    tars[0].write_bytes(data[:len(data) // 2])
    # with img2dataset's sidecar the rows the tar lost are recorded, the job completes
    _, info = _embed(tmp_path / "wds", tmp_path / "out", embed_model)
    rows = read_folder(tmp_path / "out")
    lost = [r for r in rows.values() if "tar unreadable" in (r["error_message"] or "")]
    assert len(rows) == 14 and lost and all(r["status"] == "failed_to_embed" for r in lost)
    assert "truncated" in lost[0]["error_message"]
    # without it the driver counts the samples and cannot: one error naming the tar
    (tmp_path / "wds" / "00000.parquet").unlink()
    with pytest.raises(FormatError, match=r"00000\.tar: not a readable tar"):
        _embed(tmp_path / "wds", tmp_path / "out2", embed_model)


def test_parquet_images_and_kind_detection(small_samples, embed_model, tmp_path):
    from reco.errors import ConfigError, FormatError

    write_parquet_images(small_samples, tmp_path / "pq", 7)
    manifest, _ = _embed(tmp_path / "pq", tmp_path / "out", embed_model)
    rows = read_folder(tmp_path / "out")
    assert manifest.info["input_format"] == "parquet-images" and len(rows) == 14
    assert rows[2]["status"] == "failed_to_download" and rows[2]["error_message"] == "HTTP 404"
    assert rows[4]["status"] == "failed_to_embed" and rows[3]["status"] == "success"
    # a URL list beside them: two kinds in one run is refused; a parquet without captions too
    pq.write_table(pq.read_table(tmp_path / "pq" / "00000.parquet").select(["url", "caption"]),
                   tmp_path / "pq" / "urls.parquet")
    with pytest.raises(ConfigError, match="inputs of several kinds"):
        _embed(tmp_path / "pq", tmp_path / "out2", embed_model)
    pq.write_table(pq.read_table(tmp_path / "pq" / "00000.parquet").select(["url", "png"]),
                   tmp_path / "nocap.parquet")
    with pytest.raises(FormatError, match=r"nocap\.parquet: no caption column"):
        _embed(tmp_path / "nocap.parquet", tmp_path / "out3", embed_model)
    with pytest.raises(ConfigError, match="--input-format 'zip'"):
        _embed(tmp_path / "pq", tmp_path / "out4", embed_model, input_format="zip")
