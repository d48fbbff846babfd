"""Trainer tensors, format ``tensors/2``: float16 blocks as fixed-size binary
(``reco.formats.encode_block`` / ``decode_block``). Round trips through slices, chunks and
Parquet row groups, the documented byte layout, and the refusal of format-1 shards, of other
formats and of NaN/inf values, each with a FormatError naming the file. (Corruption of every
format, these shards included: tests/test_formats_properties.py.)"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reco import formats
from reco.errors import FormatError
from reco.trainer.tensors import read_tensors_shard
from tests.fixtures.old_formats import fp16_lists
from tests.test_formats_properties import DIM, FIELDS, K, PROFILE, _unit, _write, parquet_bytes, tensors_table


@PROFILE
@given(n=st.integers(0, 12), k=st.integers(1, 4), dim=st.integers(1, 7), data=st.data())
def test_tensor_blocks_round_trip_through_slices_chunks_and_parquet(n, k, dim, data):
    values = np.random.default_rng(n * 31 + k * 7 + dim).normal(size=(n, k, dim)).astype(np.float32)
    column = formats.encode_block(values if k > 1 else values[:, 0], dim, k)
    assert column.type == formats.block_type(dim, k) and len(column) == n
    expected = values.astype(np.float16)
    got = formats.decode_block(column, dim, k)
    assert got.shape == (n, k, dim) and not got.flags.writeable
    np.testing.assert_array_equal(got, expected)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    np.testing.assert_array_equal(formats.decode_block(column.slice(lo, hi - lo), dim, k), expected[lo:hi])
    chunked = pa.chunked_array([column.slice(0, lo), column.slice(lo)], formats.block_type(dim, k))
    np.testing.assert_array_equal(formats.decode_block(chunked, dim, k), expected)
    table = pa.table({"x": column})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, hi - lo))
    parquet = pq.ParquetFile(io.BytesIO(buf.getvalue()))
    back = [formats.decode_block(parquet.read_row_group(g).column("x"), dim, k)
            for g in range(parquet.num_row_groups)]
    np.testing.assert_array_equal(np.concatenate(back) if back else np.zeros((0, k, dim)), expected)
    # the documented layout: little-endian float16, row-major (k, dim) per row
    assert column.buffers()[1].to_pybytes()[:values.size * 2] == expected.astype("<f2").tobytes()


def old_tensors_table(n: int = 4, metadata: bool = True) -> pa.Table:
    """A shard of format tensors/1 (float16 fixed-size lists), as written before format 2."""
    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("v", pa.list_(pa.float16(), DIM)),
              pa.field("t", pa.list_(pa.float16(), DIM))]
    fields += [pa.field(f, pa.list_(pa.float16(), K * DIM)) for f in FIELDS]
    meta = {b"reco.format": b"tensors/1", b"reco.dim": str(DIM).encode(), b"reco.k": str(K).encode(),
            b"reco.fields": ",".join(FIELDS).encode()} if metadata else None
    cols = [pa.array(range(n), pa.int64()), fp16_lists(_unit(n, DIM), DIM), fp16_lists(_unit(n, DIM, 1), DIM)]
    cols += [fp16_lists(_unit(n, K * DIM, 2 + j), K * DIM) for j in range(len(FIELDS))]
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=meta))


@pytest.mark.parametrize("metadata", [True, False])
def test_format_1_tensors_are_refused_with_the_rerun_advice(tmp_path, metadata):
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(old_tensors_table(metadata=metadata)))
    with pytest.raises(FormatError, match=f"{path}: trainer tensors of format tensors/1.*"
                                          f"reco precompute-neighbours --force"):
        read_tensors_shard(path)
    with pytest.raises(FormatError, match="tensors/1.*precompute-neighbours --force"):
        formats.decode_block(old_tensors_table().column("v"), DIM)


def test_other_tensors_format_is_refused(tmp_path):
    table = tensors_table()
    table = table.replace_schema_metadata({**table.schema.metadata, b"reco.format": b"tensors/3"})
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(table))
    with pytest.raises(FormatError, match=f"{path}: reco.format is b'tensors/3', expected 'tensors/2'"):
        read_tensors_shard(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_tensors_is_refused(tmp_path, bad):
    table = tensors_table()
    block = formats.decode_block(table.column("t_txt_img"), DIM, K).copy()
    block[3, 1, 2] = bad
    i = table.schema.get_field_index("t_txt_img")
    table = table.set_column(i, table.schema.field(i), formats.encode_block(block, DIM, K))
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(table))
    with pytest.raises(FormatError, match=f"{path}: column 't_txt_img'.*NaN/inf, first at row 3"):
        read_tensors_shard(path)
