"""Corrupt artefacts of every kind, read by the stage's own reader: one RecoError naming the file.

Each row of :data:`CASES` names an artefact (a path in a run folder), a corruption from
:data:`CORRUPTIONS` and the reader the stage uses from :data:`READERS`; the test copies a valid
run, corrupts the one file, calls the reader and expects one ``reco.errors.RecoError`` whose
message names the file (never a raw json/numpy/faiss traceback). Extend the list with one line.

The run is synthetic (clustered unit vectors written as real embedded shards, a real index built
by ``build_memory_index``), so the module costs a few seconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.errors import RecoError
from tests.fixtures.index import make_synthetic

GARBAGE = bytes(range(256)) * 3                # not UTF-8, not JSON, not npy, not faiss


def _set_key(key: str, value: Any) -> Callable[[Path], None]:
    """Replace one key of a JSON object (dotted path) by a value of the wrong type."""
    def corrupt(path: Path) -> None:
        data = json.loads(path.read_text())
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
        path.write_text(json.dumps(data))
    return corrupt


def _npy(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, allow_pickle=True)     # writing only: never loaded so


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
    "truncate-end": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(GARBAGE),
    "json-list": lambda p: p.write_text("[1, 2, 3]"),
    "json-null": lambda p: p.write_text("null"),
    "dim-as-string": _set_key("dim", "64"),
    "model-id-as-number": _set_key("model_id", 7),
    "nprobe-as-list": _set_key("indices.img.nprobe", [1, 2]),
    "indices-as-list": _set_key("indices", ["img", "txt"]),
    "fingerprint-as-number": _set_key("fingerprint", 12345),
    "shards-as-string": _set_key("shards", "part-00000.parquet"),
    "object-array": _npy(np.array([{"a": 1}, None], dtype=object)),
    "float-array": _npy(np.zeros(5, np.float32)),
    "one-dimensional": _npy(np.zeros(5, np.float16)),
    "stats-not-json": lambda p: pq.write_table(
        pq.read_table(p).replace_schema_metadata({**pq.read_schema(p).metadata, b"reco.stats": b"{oops"}), p),
}


def _memory(run: dict, *, mmap: bool = False, indices: bool = True):
    from reco.index.memory import Memory

    return Memory.load(run["cfg"].paths.index, mmap=mmap, load_indices=indices)


def _neighbours(run: dict):
    from reco.pipelines.neighbours import precompute_neighbours

    return precompute_neighbours(run["cfg"])


def _embed_plan(run: dict):
    """What ``reco embed-memory --input URLS --output OUT`` runs before any download."""
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import plan_job

    return plan_job([str(run["urls"])], str(run["embed_out"]), model=run["model"], pretrained=None,
                    embed_cfg=EmbedConfig(shard_size=10))


def _build_index(run: dict):
    from reco.index.build import build_memory_index

    return build_memory_index(run["cfg"])


def _manifests(run: dict):
    from reco.pipelines.neighbours import shards as neighbour_shards

    return neighbour_shards.shard_stats(run["cfg"].paths.neighbours, "part-00000.parquet")


# the reader each stage uses for the artefact (what neighbours / evaluate / the model load)
READERS: dict[str, Callable[[dict], Any]] = {
    "memory": _memory,                                   # RecoModel, evaluate, query, react
    "memory-mmap": lambda run: _memory(run, mmap=True),  # the neighbours pass's workers
    "precompute-neighbours": _neighbours,                # its driver, before the Beam job
    "embed-memory": _embed_plan,                         # its driver, before the Beam job
    "build-index": _build_index,
    "neighbour-stats": _manifests,                       # precompute-neighbours' manifests
}

# artefact (in the run folder)        corruption                reader
CASES = [
    ("index/info.json",                "truncate",               "memory"),
    ("index/info.json",                "garbage",                "memory"),
    ("index/info.json",                "json-list",              "memory"),
    ("index/info.json",                "json-null",              "memory"),
    ("index/info.json",                "dim-as-string",          "memory"),
    ("index/info.json",                "model-id-as-number",     "memory"),
    ("index/info.json",                "nprobe-as-list",         "memory"),
    ("index/info.json",                "indices-as-list",        "memory"),
    ("index/info.json",                "truncate",               "precompute-neighbours"),
    ("index/image.index",              "truncate",               "memory"),
    ("index/image.index",              "truncate-end",           "memory-mmap"),
    ("index/text.index",               "garbage",                "memory"),
    ("index/text.index",               "empty",                  "memory"),
    ("index/memory_ids.npy",           "object-array",           "memory"),
    ("index/memory_ids.npy",           "object-array",           "precompute-neighbours"),
    ("index/memory_ids.npy",           "float-array",            "memory"),
    ("index/memory_ids.npy",           "truncate",               "memory-mmap"),
    ("index/memory_image.npy",         "garbage",                "memory"),
    ("index/memory_text.npy",          "one-dimensional",        "memory"),
    ("neighbours/plan.json",           "truncate",               "precompute-neighbours"),
    ("neighbours/plan.json",           "garbage",                "precompute-neighbours"),
    ("neighbours/plan.json",           "json-list",              "precompute-neighbours"),
    ("neighbours/plan.json",           "fingerprint-as-number",  "precompute-neighbours"),
    ("neighbours/ids/part-00000.parquet", "stats-not-json",      "neighbour-stats"),
    ("embeddings/out/record.json",     "truncate",               "embed-memory"),
    ("embeddings/out/record.json",     "garbage",                "embed-memory"),
    ("embeddings/out/record.json",     "json-list",              "embed-memory"),
    ("embeddings/memory/manifest.json", "truncate",              "build-index"),
    ("embeddings/memory/manifest.json", "shards-as-string",      "build-index"),
    ("embeddings/train/manifest.json", "garbage",                "precompute-neighbours"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embed_model):
    """A synthetic run folder: embedded splits, a built index, a neighbours plan and one ids
    shard, and an embed-memory output folder with its run record; plus a URL list."""
    from reco.index.build import build_memory_index
    from reco.pipelines.neighbours.shards import ids_table
    from reco.formats import atomic_write_text

    root = tmp_path_factory.mktemp("corrupt") / "run"
    cfg, _ = make_synthetic(root, n_memory=300, n_train=40, n_test=20, dim=16, n_clusters=8)
    build_memory_index(cfg)
    neighbours = cfg.paths.neighbours
    (neighbours / "ids").mkdir(parents=True)
    atomic_write_text(neighbours / "plan.json", json.dumps({"fingerprint": "0123456789abcdef", "k": 4}))
    hits = {"v_img": (np.zeros((2, 4), np.float32), np.zeros((2, 4), np.int64))}
    pq.write_table(ids_table(np.arange(2), hits, 4, {"n_excluded": 0, "n_missing": 0}),
                   neighbours / "ids" / "part-00000.parquet")
    urls = root / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a"]}), urls)
    out = cfg.paths.embeddings / "out"
    out.mkdir(parents=True)
    _embed_plan({"urls": urls, "embed_out": out, "model": embed_model})    # writes its record
    return {"root": root, "cfg": cfg, "urls": urls, "model": embed_model}


def _copy(pristine: dict, tmp_path: Path) -> dict:
    import dataclasses

    root = Path(shutil.copytree(pristine["root"], tmp_path / "run"))
    cfg = dataclasses.replace(pristine["cfg"], workdir=str(root))
    return {**pristine, "root": root, "cfg": cfg, "urls": root / "urls.parquet",
            "embed_out": root / "embeddings" / "out"}


@pytest.mark.parametrize("artefact,corruption,reader", CASES,
                         ids=[f"{a}-{c}-{r}" for a, c, r in CASES])
def test_corrupt_artefact_is_one_error_naming_it(pristine, tmp_path, artefact, corruption, reader):
    run = _copy(pristine, tmp_path)
    path = run["root"] / artefact
    assert path.is_file(), f"the pristine run has no {artefact}"
    CORRUPTIONS[corruption](path)
    with pytest.raises(RecoError) as info:
        READERS[reader](run)
    assert str(path) in str(info.value), f"error does not name {path}: {info.value}"


def test_pristine_run_reads(pristine, tmp_path):
    """The same readers accept the uncorrupted run (the failures above are the corruption's)."""
    run = _copy(pristine, tmp_path)
    memory = _memory(run)
    assert memory.n == len(memory.ids) > 0 and set(memory.indices) == {"img", "txt"}
    assert _memory(run, mmap=True).n == memory.n
    assert _embed_plan(run).shards == 1
    assert _manifests(run) == {"n_excluded": 0, "n_missing": 0}


def test_cli_prints_one_line_naming_the_file(pristine, tmp_path, capsys):
    """Through ``reco``: exit code 2 and one line on stderr naming the file, no traceback."""
    from reco.cli import main

    run = _copy(pristine, tmp_path)
    plan = run["root"] / "neighbours" / "plan.json"
    CORRUPTIONS["truncate"](plan)
    rc = main(["precompute-neighbours", "--preset", "tiny", "--workdir", str(run["root"]), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and str(plan) in err and "--force" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_build_index_rebuilds_over_its_own_corrupt_info(pristine, tmp_path, caplog):
    """build-index's own completion marker unreadable: the index is rebuilt (with a warning
    naming the file), not reused and not a crash."""
    run = _copy(pristine, tmp_path)
    info_path = run["cfg"].paths.index / "info.json"
    CORRUPTIONS["truncate"](info_path)
    info = _build_index(run)
    assert not info.get("skipped") and _memory(run).n == info["n"]
    assert str(info_path) in caplog.text
