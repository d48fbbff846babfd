"""Embedded shards, format ``embedded/2`` (reco.formats.embedded_schema): vectors as float16
fixed-size binary. Round trips, the documented byte layout, the dimension checks, and shards of
the old format ``embedded/1`` (float16 lists) refused by every reader with the rerun advice."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reco import embedded, formats
from reco.embedded import open_split, read_shard, read_split
from reco.errors import FormatError
from reco.evaluation.data import load_embedded
from reco.index.synthetic import write_embedded
from tests.fixtures.old_formats import rewrite_embedded_v1

D = 8
RERUN = "rerun `reco embed-memory --force`"


def _unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def split(tmp_path) -> Path:
    """Three shards of 4 rows; rows 1 and 6 failed (zero vectors)."""
    status = ["success"] * 12
    status[1] = status[6] = "failed_to_download"
    write_embedded(tmp_path / "emb", _unit(12), _unit(12, seed=1), status=status, shard_size=4)
    return tmp_path / "emb"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 9), dim=st.integers(1, 6), data=st.data())
def test_vectors_round_trip_through_slices_chunks_and_parquet(n, dim, data):
    values = np.random.default_rng(n * 7 + dim).normal(size=(n, dim)).astype(np.float32)
    column = formats.encode_vectors(values, dim)
    assert column.type == formats.block_type(dim) == pa.binary(2 * dim)
    half = values.astype(np.float16)
    got = formats.decode_vectors(column, dim, np.float16)
    assert got.shape == (n, dim) and not got.flags.writeable
    np.testing.assert_array_equal(got, half)
    np.testing.assert_array_equal(formats.decode_vectors(column, dim), half.astype(np.float32))
    assert formats.decode_vectors(column, dim).dtype == np.float32
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    np.testing.assert_array_equal(formats.decode_vectors(column.slice(lo, hi - lo), dim), half[lo:hi])
    chunked = pa.chunked_array([column.slice(0, lo), column.slice(lo)], formats.block_type(dim))
    np.testing.assert_array_equal(formats.decode_vectors(chunked, dim), half)
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_emb": column}), buf, row_group_size=max(1, hi - lo))
    back = pq.read_table(io.BytesIO(buf.getvalue())).column("image_emb")
    np.testing.assert_array_equal(formats.decode_vectors(back, dim), half)
    # the documented layout: dim little-endian float16 per row, no padding; the pandas recipe
    assert column.buffers()[1].to_pybytes()[:values.size * 2] == half.astype("<f2").tobytes()
    rows = back.to_pylist()
    recipe = np.frombuffer(b"".join(rows), dtype="<f2").reshape(len(rows), -1) if rows else half
    np.testing.assert_array_equal(recipe, half)


def test_encode_vectors_checks_the_shape():
    with pytest.raises(FormatError, match=r"expected embeddings of shape \(n, 8\), got \(3, 4\)"):
        formats.encode_vectors(np.zeros((3, 4)), D)
    with pytest.raises(FormatError, match=r"shape \(n, 8\), got \(3, 1, 8\)"):
        formats.encode_vectors(np.zeros((3, 1, D)), D)


def test_written_shards_are_format_2_and_read_back(split):
    path = split / "part-00000.parquet"
    schema = pq.read_schema(path)
    assert schema.metadata[b"reco.format"] == formats.EMBEDDED_FORMAT.encode() == b"embedded/2"
    assert schema.field("image_emb").type == pa.binary(2 * D) and formats.embedded_dim(schema, "x") == D
    raw = pq.read_table(path).column("image_emb")
    assert not formats.decode_vectors(raw, D)[1].any()              # failed row: zero vector
    assert json.loads((split / "manifest.json").read_text())["info"]["format"] == "embedded/2"
    data = read_split(open_split(split))
    ok = np.array([i not in (1, 6) for i in range(12)])
    assert data["id"].tolist() == np.flatnonzero(ok).tolist()
    np.testing.assert_allclose(data["image"], _unit(12)[ok], atol=2e-3)
    np.testing.assert_array_equal(read_shard(str(split / "part-00001.parquet"), D, 1, 3)["id"], [5, 7])
    assert embedded.read_table(path, dim=D).num_rows == 4
    np.testing.assert_array_equal(load_embedded(split).text_emb, data["text"])


@pytest.mark.parametrize("metadata", [True, False], ids=["embedded/1", "no-metadata"])
def test_old_format_is_one_error_with_the_rerun_advice(split, metadata):
    path = split / "part-00001.parquet"
    rewrite_embedded_v1(path, metadata=metadata)
    advice = f"{path}: embedded shard of format embedded/1 .*{RERUN.replace('`', '.')}"
    with pytest.raises(FormatError, match=advice):
        open_split(split)                                     # footers, before any work
    with pytest.raises(FormatError, match=advice):
        read_shard(str(path), D)
    with pytest.raises(FormatError, match=advice):
        embedded.read_table(path)
    with pytest.raises(FormatError, match=advice):
        load_embedded(split)
    old = pq.read_table(path).column("image_emb")
    with pytest.raises(FormatError, match="has type fixed_size_list.*embedded/1.*embed-memory --force"):
        formats.decode_vectors(old, D)


def test_other_embedded_format_is_refused(split):
    path = split / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"reco.format": b"embedded/3"}), path)
    with pytest.raises(FormatError, match=f"{path}: reco.format is b'embedded/3', expected 'embedded/2'"):
        open_split(split)


def test_dimension_of_metadata_and_columns_must_agree(split):
    path = split / "part-00002.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"reco.dim": b"6"}), path)
    match = rf"{path}: column 'image_emb' has type fixed_size_binary\[16\], expected fixed_size_binary\[12\]"
    for read in (lambda: open_split(split), lambda: read_shard(str(path), D),
                 lambda: embedded.read_table(path), lambda: load_embedded(split)):
        with pytest.raises(FormatError, match=match):
            read()


def test_shard_of_another_dimension_names_the_shard(split, tmp_path):
    write_embedded(tmp_path / "other", _unit(4, 2 * D), _unit(4, 2 * D, 1))
    path = split / "part-00001.parquet"
    shutil.copy(tmp_path / "other" / "part-00000.parquet", path)
    with pytest.raises(FormatError, match=rf"{path}: column 'image_emb' has type fixed_size_binary\[32\] "
                                          rf"\(dimension 16\), expected fixed_size_binary\[16\] "
                                          rf"\(dimension 8 from the manifest\)"):
        open_split(split)
    with pytest.raises(FormatError, match=rf"{path} \(dimension 8 from .*part-00000.parquet\): "
                                          rf"column 'image_emb' has type fixed_size_binary\[32\]"):
        load_embedded(split)
