"""Property-based tests (hypothesis) over the readers of every on-disk format: embedded shards,
neighbour and tensor shards, manifests, URL lists (CSV/TSV/Parquet), JSON artefacts (heads.json,
index info.json), npy arrays. Each is read through the production reader, the function the
stages call (``reco.embedded.read_table``, ``reco.pipelines.neighbours.shards.read_ids``,
``reco.trainer.tensors.read_tensors_shard``, ``reco.formats.Manifest.read``,
``reco.index.memory.read_info``, ``reco.trainer.checkpoint.load_heads``, ...). A corrupted, truncated or ill-typed file is either read (and then
valid) or rejected with ONE reco.errors.RecoError whose message names the file; never a raw
pyarrow/json/KeyError traceback, never a hang (each read runs under an alarm)."""
from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reco import embedded, formats, validate
from reco.errors import FormatError, MismatchError, RecoError
from reco.index.memory import read_info
from reco.pipelines.config import EmbedConfig
from reco.pipelines.neighbours.shards import read_ids
from reco.pipelines.urls import inspect_url_files, read_rows
from reco.trainer.tensors import read_tensors_shard

DIM, K = 8, 3
FIELDS = ("v_img_txt", "t_txt_img")
PROFILE = settings(max_examples=40, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextlib.contextmanager
def alarm(seconds: int = 20):
    def fail(*_):
        raise TimeoutError(f"read did not finish in {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def clean(read, path):
    """Run ``read()``: a value, or None after a RecoError naming ``path``; anything else fails."""
    with alarm():
        try:
            return read()
        except RecoError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            return None


# ---------------------------------------------------------------------------------------------
# valid files and corruptions of their bytes
# ---------------------------------------------------------------------------------------------

def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedded_table(n: int = 6) -> pa.Table:
    status = ["success", "failed_to_download"] * (n // 2)
    return pa.Table.from_pydict({
        "id": pa.array(range(n), pa.int64()), "url": [f"http://h/{i}.png" for i in range(n)],
        "caption": [f"c {i}" for i in range(n)], "label": pa.array([i % 2 for i in range(n)], pa.int64()),
        "status": status, "error_message": [None if s == "success" else "404" for s in status],
        "image_emb": formats.encode_vectors(_unit(n, DIM), DIM),
        "text_emb": formats.encode_vectors(_unit(n, DIM, 1), DIM)}, schema=formats.embedded_schema(DIM, "m", "p"))


def neighbours_table(n: int = 5) -> pa.Table:
    schema = formats.neighbours_schema(K, ["t_txt", "v_img"])
    ids = [[int(j) for j in range(i, i + K)] for i in range(n)]
    scores = [[1.0 - 0.1 * j for j in range(K)] for _ in range(n)]
    return pa.Table.from_pydict({"id": pa.array(range(n), pa.int64()),
                                 "t_txt_ids": ids, "t_txt_scores": scores,
                                 "v_img_ids": ids, "v_img_scores": scores}, schema=schema)


def tensors_table(n: int = 4) -> pa.Table:
    cols = {"id": pa.array(range(n), pa.int64()), "v": formats.encode_block(_unit(n, DIM), DIM),
            "t": formats.encode_block(_unit(n, DIM, 1), DIM)}
    for j, f in enumerate(FIELDS):
        cols[f] = formats.encode_block(_unit(n, K * DIM, 2 + j), DIM, K)
    return pa.Table.from_pydict(cols, schema=formats.tensors_schema(DIM, K, FIELDS))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "random", "empty", "insert"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=2048))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            out[i] = draw(st.integers(0, 255))
        else:
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Parquet shards
# ---------------------------------------------------------------------------------------------
SHARDS = {"embedded": (embedded_table, embedded.read_table),
          "neighbours": (neighbours_table, read_ids),
          "tensors": (tensors_table, read_tensors_shard)}


@pytest.mark.parametrize("kind", SHARDS)
def test_valid_shards_are_read(tmp_path, kind):
    make, read = SHARDS[kind]
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(make()))
    assert read(path).num_rows == make().num_rows


@pytest.mark.parametrize("kind", SHARDS)
@PROFILE
@given(data=st.data())
def test_corrupted_shards(tmp_path, kind, data):
    make, read = SHARDS[kind]
    path = _write(tmp_path, "part-00000.parquet", data.draw(corrupted(parquet_bytes(make()))))
    table = clean(lambda: read(path), path)
    if table is not None:                       # read: then it is a valid shard of its kind
        assert clean(lambda: read(path), path) is not None


def _retyped(table: pa.Table, name: str, typ: pa.DataType) -> pa.Table:
    i = table.schema.get_field_index(name)
    try:
        column = table.column(name).cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        column = pa.nulls(table.num_rows, typ)
    return table.set_column(i, pa.field(name, typ), column).replace_schema_metadata(table.schema.metadata)


OTHER_TYPES = [pa.int32(), pa.float64(), pa.string(), pa.binary(), pa.bool_(), pa.list_(pa.float32()),
               pa.list_(pa.float16(), DIM), pa.list_(pa.float16(), DIM + 1), pa.binary(2 * DIM + 2),
               pa.binary(2 * DIM + 1), pa.null()]


@pytest.mark.parametrize("kind", SHARDS)
@PROFILE
@given(data=st.data())
def test_shards_with_wrong_types_or_missing_columns(tmp_path, kind, data):
    make, read = SHARDS[kind]
    table = make()
    name = data.draw(st.sampled_from(table.schema.names))
    if data.draw(st.booleans()):
        table = table.drop_columns([name])
    else:
        current = table.schema.field(name).type
        table = _retyped(table, name, data.draw(st.sampled_from([t for t in OTHER_TYPES if t != current])))
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(table))
    with alarm():
        with pytest.raises(FormatError) as info:
            read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_vectors_are_refused(tmp_path, bad):
    table = embedded_table()
    emb = _unit(6, DIM)
    emb[2, 3] = bad                              # row 2 is a success row
    table = table.set_column(table.schema.get_field_index("image_emb"), table.schema.field("image_emb"),
                             formats.encode_vectors(emb, DIM))
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(table))
    with pytest.raises(FormatError, match="NaN/inf.*row 1|NaN/inf"):
        embedded.read_table(path)
    with pytest.raises(FormatError, match=r"NaN/inf, first at row 2"):
        validate.check_vectors(emb, DIM, "queries.npy")


def test_wrong_dimension_is_a_mismatch(tmp_path):
    path = _write(tmp_path, "part-00000.parquet", parquet_bytes(embedded_table()))
    with pytest.raises(MismatchError, match=f"{path}.*dimension 8, expected 16"):
        embedded.read_table(path, dim=16)
    with pytest.raises(FormatError, match="expected \\(n, 16\\)"):
        validate.check_vectors(np.zeros((3, 8)), 16, "queries")
    with pytest.raises(MismatchError, match="made with model 'a|', expected 'b|'"):
        validate.check_same_model("a|", "b|", "index/info.json")
    with pytest.raises(MismatchError, match="lr: saved 0.1 != now 0.2"):
        validate.check_config_match({"lr": 0.1, "k": 4}, {"lr": 0.2, "k": 4}, "checkpoint step-10")


# ---------------------------------------------------------------------------------------------
# manifests and JSON artefacts
# ---------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
MANIFEST = {"kind": "embedded", "shards": ["part-00000.parquet"], "counts": {"success": 3}, "info": {"dim": 8}}
INDEX_INFO = {"model_id": "reco-tiny|", "dim": 64, "n": 100, "indices": {}}
HEADS = {"dim": 64, "k": 4, "model_id": "reco-tiny|", "fusion": "transformer", "sides": ["image"],
         "fields": {"image": "v_img_txt"}, "train": {"head": {}}}


@st.composite
def mutated_json(draw, base: dict) -> bytes:
    choice = draw(st.sampled_from(["value", "drop", "whole", "bytes"]))
    data = dict(base)
    if choice == "value":
        data[draw(st.sampled_from(sorted(base)))] = draw(JSON)
    elif choice == "drop":
        data.pop(draw(st.sampled_from(sorted(base))))
    elif choice == "whole":
        return json.dumps(draw(JSON)).encode()
    else:
        return draw(corrupted(json.dumps(base).encode()))
    return json.dumps(data).encode()


@PROFILE
@given(raw=mutated_json(MANIFEST))
def test_manifests(tmp_path, raw):
    _write(tmp_path, "manifest.json", raw)
    manifest = clean(lambda: formats.Manifest.read(tmp_path), tmp_path)
    if manifest is not None:
        assert all(Path(p).parent == tmp_path for p in manifest.shard_paths(tmp_path))
        assert all(isinstance(v, int) for v in manifest.counts.values())


def _heads_meta(folder):
    from reco.trainer.checkpoint import read_heads_meta
    return read_heads_meta(folder)


# (valid content, typed keys, file name, the production reader of the folder)
JSON_ARTEFACTS = {"index-info": (INDEX_INFO, validate.INDEX_INFO_KEYS, "info.json", read_info),
                  "heads-json": (HEADS, validate.HEADS_META_KEYS, "heads.json", _heads_meta)}


@pytest.mark.parametrize("base,keys,name,read", JSON_ARTEFACTS.values(), ids=list(JSON_ARTEFACTS))
@PROFILE
@given(data=st.data())
def test_json_artefacts(tmp_path, base, keys, name, read, data):
    path = _write(tmp_path, name, data.draw(mutated_json(base)))
    got = clean(lambda: read(tmp_path), path)
    if got is not None:
        assert all(isinstance(got[k], t) for k, t in keys.items())


@PROFILE
@given(data=st.data())
def test_npy_arrays(tmp_path, data):
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.int64))
    raw = data.draw(corrupted(buf.getvalue()))
    path = _write(tmp_path, "memory_ids.npy", raw)
    got = clean(lambda: validate.load_npy(path, dtype=np.int64, ndim=1), path)
    if got is not None:
        assert got.dtype == np.int64 and got.ndim == 1


def test_npy_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "memory_ids.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="memory_ids.npy"):
        validate.load_npy(path)


# ---------------------------------------------------------------------------------------------
# URL lists
# ---------------------------------------------------------------------------------------------
CELL = st.one_of(st.text(max_size=30), st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
                 st.integers().map(str), st.just(""), st.just('"'), st.just("\n"))


def read_url_list(path: Path):
    files = inspect_url_files([str(path)], EmbedConfig())
    rows = [r for f in files for r in read_rows(f)]
    assert len(rows) == sum(f.rows for f in files)
    assert all(isinstance(r["url"], (str, type(None))) and isinstance(r["caption"], (str, type(None)))
               and isinstance(r["label"], (int, type(None))) for r in rows)
    return rows


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
@PROFILE
@given(data=st.data())
def test_csv_url_lists(tmp_path, suffix, data):
    sep = "," if suffix == "csv" else "\t"
    header = data.draw(st.sampled_from([["url", "caption"], ["url", "caption", "label"], ["URL", "TEXT"],
                                        ["url"], ["caption", "url", "label"]]))
    lines = [sep.join(header)] + [sep.join(data.draw(st.lists(CELL, min_size=0, max_size=4)))
                                  for _ in range(data.draw(st.integers(0, 6)))]
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):
        raw = data.draw(corrupted(raw)) if raw else raw
    path = _write(tmp_path, f"urls.{suffix}", raw)
    clean(lambda: read_url_list(path), path)


COLUMN_TYPES = {"string": (pa.string(), st.text(max_size=10)), "binary": (pa.binary(), st.binary(max_size=10)),
                "int64": (pa.int64(), st.integers(-2**63, 2**63 - 1)), "float": (pa.float64(), st.floats()),
                "bool": (pa.bool_(), st.booleans()), "list": (pa.list_(pa.int64()), st.lists(st.integers(0, 9), max_size=3))}


@PROFILE
@given(data=st.data())
def test_parquet_url_lists(tmp_path, data):
    n = data.draw(st.integers(0, 5))
    cols = {}
    for name in data.draw(st.sampled_from([("url", "caption"), ("url", "caption", "label"), ("url",), ("x", "y")])):
        typ, values = COLUMN_TYPES[data.draw(st.sampled_from(sorted(COLUMN_TYPES)))]
        cols[name] = pa.array([data.draw(st.none() | values) for _ in range(n)], typ)
    raw = parquet_bytes(pa.table(cols))
    if data.draw(st.booleans()):
        raw = data.draw(corrupted(raw))
    path = _write(tmp_path, "urls.parquet", raw)
    clean(lambda: read_url_list(path), path)


def test_url_list_errors_name_file_and_column(tmp_path):
    path = _write(tmp_path, "urls.csv", b"link,text\nhttp://a/x.png,hi\n")
    with pytest.raises(FormatError, match=r"urls.csv: missing column\(s\) \['url', 'caption'\].*embed.url_col"):
        inspect_url_files([str(path)], EmbedConfig())
    path = _write(tmp_path, "labels.csv", b"url,caption,label\nhttp://a/x.png,hi,3\nhttp://a/y.png,yo,bird\n")
    with pytest.raises(FormatError, match="labels.csv.*label"):
        inspect_url_files([str(path)], EmbedConfig())
    path = _write(tmp_path, "bad.csv", b"url,caption\nhttp://a/x.png,hi,extra,cells\n")
    with pytest.raises(FormatError, match="bad.csv"):
        inspect_url_files([str(path)], EmbedConfig())


# ---------------------------------------------------------------------------------------------
# trained heads (heads.json + heads.safetensors, read by reco.trainer.checkpoint.load_heads)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heads_files(tmp_path_factory):
    import dataclasses

    import torch

    from reco.trainer.checkpoint import HEADS_META, HEADS_WEIGHTS, save_heads
    from reco.trainer.config import HeadConfig, TrainConfig
    from reco.trainer.heads import build_head

    torch.manual_seed(0)
    tc = TrainConfig(head=HeadConfig(heads=2))
    folder = tmp_path_factory.mktemp("heads")
    save_heads(folder, {"image": build_head("transformer", 16, tc.head)},
               {"train": dataclasses.asdict(tc), "dim": 16, "k": 4, "model_id": "reco-tiny|",
                "fusion": "transformer", "fields": {"image": "v_img_txt", "text": None}})
    return json.loads((folder / HEADS_META).read_text()), (folder / HEADS_WEIGHTS).read_bytes()


@settings(PROFILE, max_examples=25)
@given(data=st.data())
def test_heads_checkpoints(tmp_path, heads_files, data):
    from reco.trainer.checkpoint import HEADS_META, HEADS_WEIGHTS, load_heads

    meta, weights = heads_files
    if data.draw(st.booleans()):
        raw_meta, raw_weights = data.draw(mutated_json(meta)), weights
    else:
        raw_meta, raw_weights = json.dumps(meta).encode(), data.draw(corrupted(weights))
    _write(tmp_path, HEADS_META, raw_meta)
    _write(tmp_path, HEADS_WEIGHTS, raw_weights)
    got = clean(lambda: load_heads(tmp_path), tmp_path)
    if got is not None:
        heads, loaded = got
        assert set(heads) <= {"image", "text"} and isinstance(loaded["dim"], int)
