"""The chain from foreign data alone (slow): the tiny world's memory as a clip-retrieval release,
its training pairs as an img2dataset webdataset download; import-embeddings, embed-memory,
build-index, precompute-neighbours and train run as ``reco`` commands in one process that never
imports ``reco.world``; the neighbour tensors match the world path's."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.formats import Manifest, decode_block
from tests.foreign import world_samples, write_release, write_webdataset
from tests.test_foreign_inputs import run_reco

pytestmark = pytest.mark.slow


def _tensors(folder) -> dict:
    manifest = Manifest.read(folder, kind="tensors")
    table = pa.concat_tables([pq.read_table(p) for p in manifest.shard_paths(folder)])
    dim, k = manifest.info["dim"], manifest.info["k"]
    order = np.argsort(table.column("id").to_numpy())
    out = {"id": table.column("id").to_numpy()[order]}
    for name in ("v", "t", "v_img_txt", "t_txt_img"):
        out[name] = decode_block(table.column(name), dim, 1 if name in "vt" else k)[order].astype(np.float32)
    return out


def test_chain_from_foreign_data_alone(tiny_neighbours, tmp_path):
    cfg = tiny_neighbours
    write_release(cfg.paths.embedded("memory"), tmp_path / "release", 4)
    write_webdataset(world_samples(cfg, "train"), tmp_path / "train-wds", 1000)
    work = tmp_path / "run"
    shutil.copytree(cfg.paths.embedded("test"), work / "embeddings" / "test")   # evaluation's split
    common = ["--preset", "tiny", "--workdir", str(work), "--model", f"local-dir:{cfg.paths.base_clip}"]
    ran = run_reco([
        ["import-embeddings", *common, "--input", str(tmp_path / "release")],
        ["embed-memory", *common, "--input", str(tmp_path / "train-wds"),
         "--output", str(work / "embeddings" / "train")],
        ["build-index", *common],
        ["precompute-neighbours", *common],
        ["train", *common, "--set", "train.steps=20"],
    ], tmp_path)
    assert ran["world_modules"] == []
    assert (work / "heads").is_dir()
    world, got = _tensors(cfg.paths.neighbours / "tensors"), _tensors(work / "neighbours" / "tensors")
    np.testing.assert_array_equal(got["id"], world["id"])             # the same training pairs
    np.testing.assert_allclose(got["v"], world["v"], atol=2e-3)
    for name in ("v_img_txt", "t_txt_img"):
        same = np.all(np.abs(got[name] - world[name]) < 2e-3, axis=(1, 2))
        assert same.mean() > 0.98, (name, same.mean())                # ties may order differently
    assert dataclasses.is_dataclass(cfg)
