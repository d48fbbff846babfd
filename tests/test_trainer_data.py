"""Streaming reader of trainer tensors: real shards written with reco.formats."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reco.errors import ConfigError, FormatError
from reco.trainer.data import TensorStream, make_loader
from reco.trainer.tensors import read_tensors_info
from tests.fixtures.trainer import synthetic_retrieval, write_tensors

FIELDS = ("v_img_txt", "t_txt_img")
N, D, K = 700, 8, 5


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tensors")
    data = synthetic_retrieval(N, D, K, seed=3)
    write_tensors(folder, v=data["v"], t=data["t"], contexts={f: data[f] for f in FIELDS},
                  rows_per_shard=300, row_group_size=64)
    return folder, data


def _stream(folder, **kw):
    kw = {"fields": FIELDS, "k": 3, "batch_size": 32, "shuffle_buffer": 100, "seed": 5, **kw}
    return TensorStream(read_tensors_info(folder, need=FIELDS), **kw)


def _ids(batches):
    return [int(i) for b in batches for i in b["id"]]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_info_reads_the_manifest_and_footers(tensors):
    info = read_tensors_info(tensors[0], need=FIELDS)
    assert (info.dim, info.k, info.fields, info.rows) == (D, K, FIELDS, N)
    assert len(info.shards) == 3 and info.row_groups[0][:2] == [64, 64]
    assert info.model_id == "test|synthetic"


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_one_epoch_covers_every_row_once_across_ranks_and_workers(tensors, world, workers):
    seen = []
    for rank in range(world):
        stream = _stream(tensors[0], rank=rank, world_size=world, num_workers=workers, epochs=1)
        seen += _ids(make_loader(stream))
    counts = Counter(seen)
    assert len(seen) == N and set(counts) == set(range(N)) and max(counts.values()) == 1


def test_batches_hold_the_stored_rows_sliced_to_k(tensors):
    folder, data = tensors
    batch = next(iter(make_loader(_stream(folder, k=3))))
    ids = batch["id"].numpy()
    assert batch["v"].dtype == torch.float16 and batch["v"].shape == (32, D)
    assert batch["v_img_txt"].shape == (32, 3, D) and batch["t_txt_img"].shape == (32, 3, D)
    np.testing.assert_allclose(batch["v"].numpy(), data["v"][ids], atol=1e-3)
    np.testing.assert_allclose(batch["t_txt_img"].numpy(), data["t_txt_img"][ids, :3], atol=1e-3)


def test_shuffling_is_deterministic_and_changes_with_epoch_and_seed(tensors):
    folder = tensors[0]
    a = _ids(_take(make_loader(_stream(folder)), 40))       # ~2 epochs
    assert a == _ids(_take(make_loader(_stream(folder)), 40))
    assert a[:N] != sorted(a[:N]) and sorted(a[:N]) == list(range(N))
    assert a[:200] != a[N:N + 200]                          # epoch 1 reshuffled
    assert a[:200] != _ids(_take(make_loader(_stream(folder, seed=6)), 7))[:200]


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_resumes_the_stream_exactly(tensors, workers):
    folder = tensors[0]
    full = _take(make_loader(_stream(folder, num_workers=workers)), 50)
    tail = _take(make_loader(_stream(folder, num_workers=workers, start_step=31)), 19)
    assert _ids(tail) == _ids(full[31:])
    assert torch.equal(tail[-1]["v_img_txt"], full[-1]["v_img_txt"])


def test_stream_without_shuffle_buffer_still_covers_everything(tensors):
    ids = _ids(make_loader(_stream(tensors[0], shuffle_buffer=0, epochs=1)))
    assert sorted(ids) == list(range(N))


def test_bad_inputs_are_clear_errors(tensors, tmp_path):
    folder = tensors[0]
    with pytest.raises(FormatError, match="no manifest"):
        read_tensors_info(tmp_path)
    with pytest.raises(FormatError, match="'v_img_img' was not precomputed"):
        read_tensors_info(folder, need=("v_img_img",))
    with pytest.raises(ConfigError, match="train.k=9"):
        _stream(folder, k=9)
    bad = tmp_path / "bad"
    data = synthetic_retrieval(20, D, K)
    write_tensors(bad, v=data["v"], t=data["t"], contexts={"v_img_txt": data["v_img_txt"]})
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["info"]["dim"] = 16
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="part-00000.parquet: column 'v' has type"):
        read_tensors_info(bad)
    manifest["info"]["dim"] = D
    manifest["shards"].append("part-00009.parquet")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="part-00009.parquet: shard listed in the manifest is missing"):
        read_tensors_info(bad)
    manifest["kind"] = "neighbours"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="expected trainer tensors"):
        read_tensors_info(bad)


def test_worker_count_must_match_the_plan(tensors):
    stream = _stream(tensors[0], num_workers=0)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    with pytest.raises(Exception, match="planned for 0 DataLoader workers"):
        next(iter(loader))


def test_shard_of_the_old_format_is_one_error_with_the_rerun_advice(tensors, tmp_path):
    """A folder still holding a tensors/1 shard (float16 lists) is refused at open, naming it."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco import formats
    from tests.fixtures.old_formats import fp16_lists

    folder = Path(shutil.copytree(tensors[0], tmp_path / "tensors"))
    path = folder / "part-00001.parquet"
    table = pq.read_table(path)
    cols, fields = [table.column("id")], [table.schema.field("id")]
    for name in table.column_names[1:]:
        k = 1 if name in ("v", "t") else K
        values = formats.decode_block(table.column(name), D, k).reshape(table.num_rows, k * D)
        cols.append(fp16_lists(values, k * D))
        fields.append(pa.field(name, pa.list_(pa.float16(), k * D)))
    meta = {**table.schema.metadata, b"reco.format": b"tensors/1"}
    pq.write_table(pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=meta)), path)
    with pytest.raises(FormatError, match=f"{path}: trainer tensors of format tensors/1.*"
                                          f"rerun `reco precompute-neighbours --force`"):
        read_tensors_info(folder, need=FIELDS)


def test_batches_are_the_stored_float16_values(tensors):
    """Decoding is exact: every yielded row equals the float16 of what was written."""
    folder, data = tensors
    batches = list(make_loader(_stream(folder, k=K, shuffle_buffer=0, epochs=1)))
    for b in batches:
        ids = b["id"].numpy()
        assert b["v"].dtype == torch.float16 and b["v_img_txt"].shape[1:] == (K, D)
        np.testing.assert_array_equal(b["v"].numpy(), data["v"][ids].astype(np.float16))
        np.testing.assert_array_equal(b["t_txt_img"].numpy(), data["t_txt_img"][ids].astype(np.float16))
