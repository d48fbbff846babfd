"""Attacks on a run's artefacts (issue 19, items 7 and 8): manifests, shards and weights that
were edited, replaced or swapped after the stage that wrote them. Each must be detected by the
next stage that reads them, with one error naming the file (never "up to date; skipping", never
a silent mix). Every test corrupts its own copy of the session's tiny run (tests/fixtures/runs.py).

To add an attack: copy the parts of the run it needs with ``copy_run``, corrupt one artefact, and
assert the error of the stage that must notice.
"""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from reco.errors import FormatError, MismatchError
from tests.fixtures.runs import copy_run

EMBEDDED = ("embeddings",)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder, data):
    (folder / "manifest.json").write_text(json.dumps(data))


def test_manifest_omitting_a_shard_is_refused(tiny_indexed, tmp_path):
    from reco.index.build import build_memory_index

    cfg = copy_run(tiny_indexed, tmp_path, EMBEDDED)
    memory = cfg.paths.embedded("memory")
    data = _manifest(memory)
    data["shards"] = data["shards"][:-1]                           # 5,403 -> 4,948 items
    _write_manifest(memory, data)
    with pytest.raises(FormatError, match=r"memory/manifest.json lists \d+ shard\(s\), the record \d+ "
                                          r"\(first difference: part-\d+.parquet\)"):
        build_memory_index(cfg)
    (memory / "record.json").unlink()                              # no record: the manifest's totals
    with pytest.raises(FormatError, match=r"lists \d+ shard\(s\), expected \d+"):
        build_memory_index(cfg)


def test_manifest_with_wrong_counts_is_refused(tiny_indexed, tmp_path):
    from reco.index.build import build_memory_index

    cfg = copy_run(tiny_indexed, tmp_path, EMBEDDED)
    memory = cfg.paths.embedded("memory")
    data = _manifest(memory)
    data["counts"]["success"] += 100
    _write_manifest(memory, data)
    with pytest.raises(FormatError, match=r"manifest.json: counts success=\d+, the record says success=\d+"):
        build_memory_index(cfg)


def test_memory_shard_replaced_after_indexing_is_detected(tiny_indexed, tmp_path):
    """Today's "up to date; skipping": the rerun must notice that its input changed."""
    from reco.index.build import build_memory_index

    cfg = copy_run(tiny_indexed, tmp_path, ("embeddings", "index"))
    memory = cfg.paths.embedded("memory")
    assert build_memory_index(cfg)["skipped"] is True               # untouched copy: up to date
    shutil.copy(cfg.paths.embedded("train") / "part-00000.parquet", memory / "part-00000.parquet")
    with pytest.raises(FormatError, match=r"memory/part-00000.parquet: content differs from the record "
                                          r"\(sha256:.*recorded sha256:.*\): replaced or changed"):
        build_memory_index(cfg)


def test_index_file_replaced_is_detected(tiny_indexed, tmp_path):
    from reco.index.memory import Memory

    cfg = copy_run(tiny_indexed, tmp_path, ("index",))
    shutil.copy(cfg.paths.index / "text.index", cfg.paths.index / "image.index")
    with pytest.raises(FormatError, match=r"index/image.index: content differs from the record"):
        Memory.load(cfg.paths.index)


def test_tensors_shard_replaced_by_another_is_refused(tiny_neighbours, tmp_path):
    """A tensors shard copied over another (duplicate ids, lost ids): train refuses before
    any step, through the record's digests and, without a record, through the ids."""
    from reco.trainer.train import train

    cfg = copy_run(tiny_neighbours, tmp_path, ("neighbours",))
    tensors = cfg.paths.neighbours / "tensors"
    shutil.copy(tensors / "part-00001.parquet", tensors / "part-00000.parquet")
    with pytest.raises(FormatError, match=r"tensors/part-00000.parquet: content differs from the record"):
        train(cfg)
    (cfg.paths.neighbours / "record.json").unlink()
    with pytest.raises(FormatError, match=r"part-00000.parquet: pair id \d+ also in part-00001.parquet|"
                                          r"part-00001.parquet: pair id \d+ also in part-00000.parquet"):
        train(cfg)
    assert not (cfg.paths.heads / "heads.json").exists()


def test_tensors_rows_disagreeing_with_the_manifest_are_refused(tiny_neighbours, tmp_path):
    from reco.trainer.tensors import read_tensors_info

    cfg = copy_run(tiny_neighbours, tmp_path, ("neighbours",))
    tensors = cfg.paths.neighbours / "tensors"
    (cfg.paths.neighbours / "record.json").unlink()
    data = _manifest(tensors)
    data["counts"]["part-00000.parquet"] += 7
    _write_manifest(tensors, data)
    with pytest.raises(FormatError, match=r"part-00000.parquet: \d+ rows, but .*manifest.json says \d+"):
        read_tensors_info(tensors)


def test_all_zero_vector_on_a_success_row_is_refused(tmp_path):
    """The content check itself (a shard without a record: written by another tool)."""
    import pyarrow as pa

    from reco.index.build import build_memory_index
    from tests.fixtures.index import make_synthetic

    cfg, _ = make_synthetic(tmp_path, n_memory=400, n_train=10, n_test=10, n_planted=0)
    path = cfg.paths.embedded("memory") / "part-00000.parquet"
    table = pq.read_table(path)
    row = 123
    column = table.column("image_emb").to_pylist()
    column[row] = bytes(len(column[row]))
    field = table.schema.field("image_emb")
    pq.write_table(table.set_column(table.schema.get_field_index("image_emb"), field,
                                    pa.array(column, type=field.type)), path)
    with pytest.raises(FormatError, match=rf"part-00000.parquet: 1 all-zero image embedding\(s\) on "
                                          rf"success rows, first at row {row}"):
        build_memory_index(cfg)


def test_shard_of_another_model_copied_in_is_refused(tiny_indexed, tmp_path):
    from reco.index.build import build_memory_index

    cfg = copy_run(tiny_indexed, tmp_path, EMBEDDED)
    memory = cfg.paths.embedded("memory")
    path = memory / "part-00003.parquet"
    table = pq.read_table(path)
    meta = {**table.schema.metadata, b"reco.model": b"ViT-B-32", b"reco.pretrained": b"openai"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    (memory / "record.json").unlink()
    with pytest.raises(MismatchError, match=r"part-00003.parquet: embedded with model 'ViT-B-32\|openai'"):
        build_memory_index(cfg)


def test_replaced_base_clip_weights_are_refused(tiny_trained, tmp_path):
    """Replaced base-CLIP weights: load_model, evaluate and a rerun of embed-memory name the
    model and the two digests (was: reco top-1 12.1 -> 2.6 silently)."""
    from safetensors.torch import load_file, save_file

    from reco import load_model
    from reco.evaluation.evaluate import evaluate
    from reco.pipelines.embed_memory import embed_splits

    cfg = copy_run(tiny_trained, tmp_path)
    weights = cfg.paths.base_clip / "open_clip_model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[name] = state[name] * 1.01
    save_file(state, weights)
    digest = r"sha256:[0-9a-f]{12}"
    with pytest.raises(MismatchError, match=rf"weights of CLIP model 'reco-tiny' changed: the heads were "
                                            rf"trained on embeddings of weights {digest}, the loaded "
                                            rf"weights are {digest}"):
        load_model(cfg.workdir)
    with pytest.raises(MismatchError, match="weights of CLIP model 'reco-tiny' changed"):
        evaluate(cfg, modes=("off",), gallery=False)
    before = sorted(p.stat().st_mtime_ns for p in cfg.paths.embedded("test").glob("part-*.parquet"))
    with pytest.raises(MismatchError, match=rf"embedded with model reco-tiny\|{digest}[0-9a-f]*, not "
                                            rf"reco-tiny\|{digest}"):
        embed_splits(cfg, ("test",))
    assert sorted(p.stat().st_mtime_ns for p in cfg.paths.embedded("test").glob("part-*.parquet")) == before
