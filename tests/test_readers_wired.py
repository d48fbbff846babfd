"""The stage readers go through validated reading: a corrupt embedded shard (reco.embedded:
reco.embedded.open_split / read_shard / read_split) or a corrupt trainer tensors shard
(reco.trainer.tensors.read_tensors_info / TensorStream) gives ONE reco.errors.RecoError naming the
file, never a raw pyarrow/numpy traceback; footer damage is caught when the folder is opened,
before any shard's data is read."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reco import formats
from reco.errors import FormatError, RecoError
from reco.embedded import open_split, read_shard, read_split
from reco.index.synthetic import write_embedded
from reco.trainer.data import TensorStream, make_loader
from reco.trainer.tensors import read_tensors_info
from tests.fixtures.trainer import synthetic_retrieval, write_tensors
from tests.test_formats_properties import alarm, corrupted

torch.set_num_threads(1)
D, K, N = 8, 3, 40
FIELDS = ("v_img_txt", "t_txt_img")
PROFILE = settings(max_examples=30, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid embedded folder (2 shards, half the rows failed) and tensors folder (2 shards,
    row groups of 10)."""
    base = tmp_path_factory.mktemp("wired")
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embedded(base / "embedded", x, x[::-1].copy(), shard_size=N // 2,
                   status=[formats.STATUS_OK, "failed_to_download"] * (N // 2))
    data = synthetic_retrieval(N, D, K, seed=1)
    write_tensors(base / "tensors", v=data["v"], t=data["t"], contexts={f: data[f] for f in FIELDS},
                  rows_per_shard=N // 2, row_group_size=10)
    return {"embedded": base / "embedded", "tensors": base / "tensors", "x": x}


def read_embedded_folder(folder: Path) -> dict:
    return read_split(open_split(folder))


def stream_tensors(folder: Path, num_workers: int = 0) -> list[dict]:
    info = read_tensors_info(folder, need=FIELDS)
    stream = TensorStream(info, fields=FIELDS, k=K, batch_size=8, shuffle_buffer=16, epochs=1,
                          num_workers=num_workers)
    return list(make_loader(stream))


READERS = {"embedded": read_embedded_folder, "tensors": stream_tensors}


def one_error(read, folder: Path, path: Path):
    """``read(folder)``: its value, or None after one RecoError naming ``path``."""
    with alarm():
        try:
            return read(folder)
        except RecoError as exc:
            assert str(path) in str(exc), f"error does not name {path}: {exc}"
            return None


def test_valid_folders_read_as_before(pristine):
    out = read_embedded_folder(pristine["embedded"])
    assert out["id"].tolist() == list(range(0, N, 2))
    np.testing.assert_allclose(out["image"], pristine["x"][::2], atol=1e-3)
    ids = sorted(int(i) for b in stream_tensors(pristine["tensors"]) for i in b["id"])
    assert ids == list(range(N))


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("shard", [0, 1])
@PROFILE
@given(data=st.data())
def test_corrupt_shard_is_one_error_naming_it(pristine, kind, shard, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(pristine[kind], Path(tmp) / kind))
        path = folder / f"part-{shard:05d}.parquet"
        path.write_bytes(data.draw(corrupted(path.read_bytes())))
        out = one_error(READERS[kind], folder, path)
        if out is not None and kind == "embedded":        # read: then it is sound
            assert len(np.unique(out["id"])) == len(out["id"]) and np.isfinite(out["image"]).all()
        elif out is not None:
            assert all(torch.isfinite(b[f].float()).all() for b in out for f in ("v", "t", *FIELDS))


@pytest.mark.parametrize("kind", READERS)
def test_damaged_footer_of_the_last_shard_fails_at_open(pristine, tmp_path, kind):
    folder = Path(shutil.copytree(pristine[kind], tmp_path / kind))
    last = folder / "part-00001.parquet"
    last.write_bytes(last.read_bytes()[:-5])              # footer length + magic cut off
    open_folder = open_split if kind == "embedded" else read_tensors_info
    with pytest.raises(FormatError, match=f"{last}: not a readable Parquet file"):
        open_folder(folder)                               # nothing of shard 0 read yet


def test_read_shard_names_the_file(pristine, tmp_path):
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(b"PAR1 not parquet at all PAR1")
    with pytest.raises(FormatError, match=f"{path}: not a readable Parquet file"):
        read_shard(str(path), D)
    table = pq.read_table(pristine["embedded"] / "part-00000.parquet").drop_columns(["status"])
    pq.write_table(table, path)
    with pytest.raises(FormatError, match=f"{path}: missing column 'status'"):
        read_shard(str(path), D)


def _edit_manifest(folder: Path, **info) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["info"].update(info)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind,info,match", [
    ("embedded", {"dim": "8"}, "info.dim is '8'"),
    ("embedded", {"dim": -2}, "info.dim is -2"),
    ("tensors", {"k": "three"}, "info.k is 'three'"),
    ("tensors", {"fields": "v_img_txt"}, "info.fields is 'v_img_txt'"),
    ("tensors", {"fields": ["v_img_txt", "x_y_z"]}, "bad context field 'x_y_z'"),
])
def test_bad_manifest_info_names_the_manifest(pristine, tmp_path, kind, info, match):
    folder = Path(shutil.copytree(pristine[kind], tmp_path / kind))
    _edit_manifest(folder, **info)
    with pytest.raises(FormatError, match=f"{folder / 'manifest.json'}: {match}"):
        (open_split if kind == "embedded" else read_tensors_info)(folder)


def test_bad_shard_metadata_names_the_shard(pristine, tmp_path):
    folder = Path(shutil.copytree(pristine["tensors"], tmp_path / "tensors"))
    _edit_manifest(folder, dim=None, k=None)
    path = folder / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"reco.dim": b"\xff8"}), path)
    with pytest.raises(FormatError, match=f"{path}: bad reco.dim metadata"):
        read_tensors_info(folder)


def test_second_embedded_shard_of_another_dimension_fails_at_open(pristine, tmp_path):
    folder = Path(shutil.copytree(pristine["embedded"], tmp_path / "embedded"))
    other = tmp_path / "other"
    x = np.ones((4, 2 * D), np.float32) / np.sqrt(2 * D)
    write_embedded(other, x, x, ids=np.arange(100, 104))
    shutil.copy(other / "part-00000.parquet", folder / "part-00001.parquet")
    with pytest.raises(FormatError, match=f"{folder / 'part-00001.parquet'}: column 'image_emb' has type"):
        open_split(folder)


def test_duplicate_ids_name_the_shards(pristine, tmp_path):
    folder = Path(shutil.copytree(pristine["embedded"], tmp_path / "embedded"))
    path = folder / "part-00001.parquet"
    table = pq.read_table(path)
    ids = table.column("id").to_numpy().copy()
    ids[0] = 0                                            # shard 0 holds id 0 (a success row)
    formats.atomic_write_table(table.set_column(0, table.schema.field("id"), pa.array(ids)), path)
    with pytest.raises(FormatError, match=f"part-00000.parquet, {path}: id 0 appears 2 times"):
        read_embedded_folder(folder)


def _tensors_with_nan(pristine, tmp_path) -> tuple[Path, Path]:
    folder = Path(shutil.copytree(pristine["tensors"], tmp_path / "tensors"))
    path = folder / "part-00001.parquet"
    table = pq.read_table(path)
    block = formats.decode_block(table.column("t_txt_img"), D, K).copy()
    block[13, 2, 1] = np.nan                              # row 13 = id 33, neighbour 2
    i = table.schema.get_field_index("t_txt_img")
    table = table.set_column(i, table.schema.field(i), formats.encode_block(block, D, K))
    formats.atomic_write_table(table, path, row_group_size=10)
    return folder, path


def test_nan_in_a_tensors_shard_is_named_with_row_group_and_id(pristine, tmp_path):
    folder, path = _tensors_with_nan(pristine, tmp_path)
    with pytest.raises(FormatError, match=f"{path}: row group 1: column 't_txt_img' has 1 row.*id 33"):
        stream_tensors(folder)


def test_error_in_a_dataloader_worker_names_the_file(pristine, tmp_path):
    folder, path = _tensors_with_nan(pristine, tmp_path)
    with pytest.raises(FormatError, match=str(path)):
        stream_tensors(folder, num_workers=1)
