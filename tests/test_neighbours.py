"""precompute-neighbours: exact ids vs numpy, duplicate exclusion, tensors, Beam job, resume, errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from reco import formats
from reco.errors import ConfigError, FormatError, MismatchError
from reco.index.build import build_memory_index
from reco.index.memory import Memory
from reco.pipelines.neighbours.shards import plan_shards
from reco.pipelines.neighbours.search import search_excluding
from reco.embedded import open_split
from reco.index.synthetic import write_embedded
from reco.pipelines.neighbours.job import (PrecomputeNeighbours, make_settings, pipeline_options,
                                          precompute_neighbours)
from tests.fixtures.index import ALL_FIELDS, make_synthetic

N_TRAIN, N_FAILED, N_COPIES = 1200, 40, 6


def _unit(x):
    x = np.asarray(x, np.float16).astype(np.float32)      # as stored, then renormalised
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Flat memory of 3000 items; the first N_COPIES train pairs are copies of memory pairs
    (pair 0..2 exact, 3..5 with a slightly perturbed image, cosine ~0.99998)."""
    cfg, data = make_synthetic(tmp_path_factory.mktemp("nb"), n_train=N_TRAIN, failed_train=N_FAILED,
                               neighbours={"fields": ALL_FIELDS, "shard_size": 500, "batch_size": 128})
    ri, rt = (x.copy() for x in data["train"])
    mi, mt = data["memory"]
    copies = np.arange(N_COPIES) * 11 + 1                  # memory rows copied into the train set
    ri[:N_COPIES], rt[:N_COPIES] = mi[copies], mt[copies]
    rng = np.random.default_rng(3)
    ri[3:N_COPIES] = _unit(ri[3:N_COPIES] + 0.004 * rng.standard_normal((3, 64)) / 8)
    status = ["success"] * (N_TRAIN - N_FAILED) + ["failed_to_download"] * N_FAILED
    write_embedded(cfg.paths.embedded("train"), ri, rt, status=status, shard_size=300,
                   ids=np.arange(N_TRAIN) + 100000)
    build_memory_index(cfg)
    data.update(train=(ri, rt), copies=copies)
    return cfg, data


@pytest.fixture(scope="module")
def computed(world):
    cfg, data = world
    return cfg, data, precompute_neighbours(cfg)


def _read(folder, name="part-00000.parquet"):
    return pq.read_table(folder / name)


def _all_rows(folder):
    manifest = formats.Manifest.read(folder)
    return manifest, [pq.read_table(p) for p in manifest.shard_paths(folder)]


def reference(memory, queries, pair_img, k, threshold, index):
    """Brute-force numpy: inner products, exclusion of the pair's image copies, top k."""
    corpus = _unit(memory.image_emb if index == "img" else memory.text_emb)
    mem_img = _unit(memory.image_emb)
    sims = queries @ corpus.T
    sims[pair_img @ mem_img.T >= threshold] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, 1), top


def test_every_train_id_once_and_manifests(computed):
    cfg, data, info = computed
    assert info["n_pairs"] == N_TRAIN - N_FAILED and info["shards"] == 3
    assert set(info["step_seconds"]) == {"read", "search", "fetch", "write"}   # Beam counters
    ids_manifest, ids_tables = _all_rows(cfg.paths.neighbours / "ids")
    t_manifest, t_tables = _all_rows(cfg.paths.neighbours / "tensors")
    got = np.concatenate([t.column("id").to_numpy() for t in ids_tables])
    np.testing.assert_array_equal(np.sort(got), np.arange(N_TRAIN - N_FAILED) + 100000)
    assert ids_manifest.kind == "neighbours" and t_manifest.kind == "tensors"
    assert t_manifest.counts["total"] == N_TRAIN - N_FAILED
    assert t_manifest.info["fields"] == list(ALL_FIELDS) and t_manifest.info["k"] == 16
    assert t_manifest.info["model_id"] == "synthetic|" and t_manifest.info["dim"] == 64
    formats.check_columns(t_tables[0].schema, formats.tensors_schema(64, 16, ALL_FIELDS), "tensors")
    assert t_tables[0].schema.metadata[b"reco.format"] == b"tensors/2"
    assert t_manifest.info["tensors_format"] == "tensors/2"           # and in the plan: shards
    plan = json.loads((cfg.paths.neighbours / "plan.json").read_text())  # of another format are
    assert plan["tensors_format"] == "tensors/2"                      # recomputed, not resumed
    formats.check_columns(ids_tables[0].schema,
                          formats.neighbours_schema(16, formats.search_keys(ALL_FIELDS)), "ids")
    for a, b in zip(ids_tables, t_tables):
        np.testing.assert_array_equal(a.column("id").to_numpy(), b.column("id").to_numpy())


def test_ids_equal_brute_force_with_exact_search(computed):
    cfg, data, _ = computed
    memory = Memory.load(cfg.paths.index)
    table = _read(cfg.paths.neighbours / "ids")
    rows = table.num_rows
    ri, rt = (_unit(x[:rows]) for x in data["train"])
    queries = {"v": ri, "t": rt}
    for search in ("v_img", "t_txt", "v_txt", "t_img"):
        q, index = search.split("_")
        ref_scores, ref_pos = reference(memory, queries[q], ri, 16, cfg.neighbours.dedup_threshold, index)
        got_ids = np.stack(table.column(f"{search}_ids").to_numpy(zero_copy_only=False))
        got_scores = np.stack(table.column(f"{search}_scores").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)
        assert (got_ids == memory.ids[ref_pos]).mean() > 0.999


def test_copies_of_the_pair_are_never_retrieved(computed):
    cfg, data, info = computed
    memory = Memory.load(cfg.paths.index)
    copy_ids = data["copies"]                           # memory ids are the memory row numbers
    assert np.isin(copy_ids, memory.ids).all()
    table = _read(cfg.paths.neighbours / "ids")
    for search in ("v_img", "t_txt", "v_txt", "t_img"):
        got = np.stack(table.column(f"{search}_ids").to_numpy(zero_copy_only=False))[:N_COPIES]
        assert not (got == copy_ids[:, None]).any(), search
        assert (got >= 0).all()                                    # still k neighbours
    assert info["n_excluded"] >= 2 * N_COPIES                      # at least v_img and t_txt
    # without exclusion the copies come first: the check above is not vacuous
    pair = {"img": _unit(data["train"][0][:N_COPIES]), "txt": _unit(data["train"][1][:N_COPIES])}
    for search in ("v_img", "t_txt"):
        _, pos, _ = search_excluding(memory, pair, search, 16, threshold=2.0, dedup_on=())
        np.testing.assert_array_equal(memory.ids[pos[:, 0]], copy_ids)


def test_tensors_hold_the_fused_embeddings(computed):
    cfg, data, _ = computed
    memory = Memory.load(cfg.paths.index)
    position = {int(i): p for p, i in enumerate(memory.ids)}
    ids, tensors = _read(cfg.paths.neighbours / "ids"), _read(cfg.paths.neighbours / "tensors")
    for field in ALL_FIELDS:
        q, index, fuse = formats.parse_field(field)
        hit_ids = np.stack(ids.column(f"{q}_{index}_ids").to_numpy(zero_copy_only=False))[:20]
        block = formats.decode_block(tensors.column(field).slice(0, 20), 64, 16)
        emb = memory.image_emb if fuse == "img" else memory.text_emb
        expected = emb[[[position[int(i)] for i in row] for row in hit_ids]].astype(np.float32)
        np.testing.assert_array_equal(block, expected)
    v = formats.decode_block(tensors.column("v"), 64)[:, 0].astype(np.float32)
    np.testing.assert_allclose(v, data["train"][0][:len(v)], atol=1e-3)


def test_resume_skips_complete_shards_and_options_restart(world, computed):
    cfg, _, first = computed
    out = cfg.paths.neighbours
    again = precompute_neighbours(cfg)
    assert again["computed_shards"] == 0 and again["skipped_shards"] == 3
    before = (out / "tensors" / "part-00000.parquet").stat().st_mtime_ns
    (out / "tensors" / "part-00001.parquet").unlink()
    resumed = precompute_neighbours(cfg)
    assert resumed["computed_shards"] == 1
    assert (out / "tensors" / "part-00000.parquet").stat().st_mtime_ns == before
    smaller = dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, k=4,
                                                                      fields=("v_img_txt",)))
    # other options: refused, naming them (never recomputed or reused silently); --force redoes
    with pytest.raises(MismatchError, match=r"option\(s\) neighbours.fields \(.*\), neighbours.k "
                                            r"\(recorded 16, now 4\).*precompute-neighbours --force"):
        precompute_neighbours(smaller)
    assert (out / "tensors" / "part-00000.parquet").stat().st_mtime_ns == before
    info = precompute_neighbours(smaller, force=True)
    assert info["computed_shards"] == 3 and info["k"] == 4
    assert _read(out / "tensors").schema.names == ["id", "v", "t", "v_img_txt"]
    precompute_neighbours(cfg, force=True)                       # restore for other tests


def test_memory_smaller_than_k_fills_minus_one(tmp_path):
    cfg, _ = make_synthetic(tmp_path, n_memory=10, n_train=30, n_test=0, n_planted=0)
    build_memory_index(cfg)
    precompute_neighbours(cfg)
    ids, tensors = _read(cfg.paths.neighbours / "ids"), _read(cfg.paths.neighbours / "tensors")
    hit = np.stack(ids.column("v_img_ids").to_numpy(zero_copy_only=False))
    assert (hit[:, :10] >= 0).all() and (hit[:, 10:] == -1).all()
    block = formats.decode_block(tensors.column("v_img_txt"), 64, 16)
    assert block[:, :10].any(axis=-1).all() and not block[:, 10:].any()


def test_beam_transform_counts_rows_end_to_end(world, tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    import apache_beam as beam

    cfg, _ = world
    split = open_split(cfg.paths.embedded("train"))
    specs = plan_shards(split, 250)
    settings = dataclasses.replace(make_settings(cfg, 64), out_folder=str(tmp_path))
    with TestPipeline() as p:
        written = p | beam.Create(specs) | PrecomputeNeighbours(settings)
        assert_that(written | "Rows" >> beam.Map(lambda r: r["rows"]) | beam.CombineGlobally(sum),
                    equal_to([N_TRAIN - N_FAILED]), label="CountRows")
        assert_that(written | "Names" >> beam.Map(lambda r: r["name"]),
                    equal_to([s.name for s in specs]), label="Names")
    got = np.concatenate([pq.read_table(tmp_path / "tensors" / s.name).column("id").to_numpy()
                          for s in specs])
    assert len(got) == len(set(got.tolist())) == N_TRAIN - N_FAILED


def test_beam_options_override_the_config(world):
    from apache_beam.options.pipeline_options import DirectOptions, PortableOptions, StandardOptions

    from reco.pipelines import runners

    cfg, _ = world
    default = pipeline_options(cfg)                  # through reco.pipelines.runners
    assert default.view_as(StandardOptions).runner == runners.FN_API_RUNNER
    assert default.view_as(DirectOptions).direct_running_mode == "in_memory"
    portable = pipeline_options(cfg, ["--runner=portable", "--job_endpoint=localhost:8099"])
    assert portable.view_as(StandardOptions).runner == "PortableRunner"      # alias resolved
    assert portable.view_as(PortableOptions).job_endpoint == "localhost:8099"
    assert portable.view_as(PortableOptions).environment_type == "LOOPBACK"  # engine default
    with pytest.raises(ConfigError, match="direct_running_mode"):
        pipeline_options(cfg, ["--direct_running_mode=multi_threading"])
    with pytest.raises(ConfigError, match="needs --job_endpoint"):
        pipeline_options(cfg, ["--runner=portable"])
    with pytest.raises(ConfigError, match="not supported"):
        pipeline_options(dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours,
                                                                                 runner="dask")))


def test_dataflow_dry_run_builds_the_job_and_writes_no_manifest(world, tmp_path):
    """precompute_neighbours with DataflowRunner --dry_run=True: the job is translated (offline,
    no credentials), nothing runs, and no manifest claims shards that were never written."""
    pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                        reason="apache-beam[gcp] (the gcp extra) is not installed")
    cfg, _ = world
    other = dataclasses.replace(cfg, workdir=str(tmp_path))
    (tmp_path / "index").symlink_to(cfg.paths.index, target_is_directory=True)
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "train").symlink_to(cfg.paths.embedded("train"), target_is_directory=True)
    info = precompute_neighbours(other, beam_options=[
        "--runner=dataflow", "--project=reco-dry-run", "--region=europe-west4",
        "--temp_location=gs://reco-dry-run-bucket/tmp", "--dry_run=True"])
    assert info["dry_run"] is True and info["manifests"] == "skipped (dry run)"
    assert info["computed_shards"] == info["shards"] == 3
    out = tmp_path / "neighbours"
    assert not any(out.glob("**/part-*.parquet")) and not any(out.glob("**/manifest.json"))


def test_worker_processes_give_the_same_shards(world, computed, tmp_path):
    """Two DirectRunner worker processes (the DoFn and its settings are pickled to them, as for a
    portable runner); the files equal those of the in-process run."""
    cfg, _, _ = computed
    other = dataclasses.replace(cfg, workdir=str(tmp_path))
    (tmp_path / "index").symlink_to(cfg.paths.index, target_is_directory=True)
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "train").symlink_to(cfg.paths.embedded("train"), target_is_directory=True)
    info = precompute_neighbours(other, beam_options=["--direct_running_mode=multi_processing",
                                                      "--direct_num_workers=2"])
    assert info["computed_pairs"] == N_TRAIN - N_FAILED and info["shards"] == 3
    for sub in ("ids", "tensors"):
        for name in formats.Manifest.read(cfg.paths.neighbours / sub).shards:
            assert pq.read_table(tmp_path / "neighbours" / sub / name).equals(
                pq.read_table(cfg.paths.neighbours / sub / name)), (sub, name)


def test_errors_before_any_work(world, tmp_path):
    cfg, data = world
    other = dataclasses.replace(cfg, workdir=str(tmp_path))
    (tmp_path / "index").symlink_to(cfg.paths.index, target_is_directory=True)
    train = other.paths.embedded("train")
    write_embedded(train, *data["train"], model="another-model")
    with pytest.raises(MismatchError, match="index built with model 'synthetic\\|', queries from model 'another-model\\|'"):
        precompute_neighbours(other)
    write_embedded(train, data["train"][0][:, :32], data["train"][1][:, :32])
    with pytest.raises(MismatchError, match="index dimension 64 != query dimension 32"):
        precompute_neighbours(other)
    write_embedded(train, *data["train"], shard_size=400)
    (train / "part-00002.parquet").unlink()
    with pytest.raises(FormatError, match="lists shard 'part-00002.parquet', which is not on disk"):
        precompute_neighbours(other)
    assert not (tmp_path / "neighbours").exists()
    bad = dataclasses.replace(other, neighbours=dataclasses.replace(other.neighbours, fields=("v_img_x",)))
    write_embedded(train, *data["train"], shard_size=400)
    with pytest.raises(FormatError, match="bad context field 'v_img_x'"):
        precompute_neighbours(bad)


def test_cli_precompute_neighbours(world, capsys):
    from reco.cli import main

    cfg, _ = world
    rc = main(["precompute-neighbours", "--preset", "tiny", "--workdir", cfg.workdir,
               "--set", "neighbours.fields=" + ",".join(ALL_FIELDS), "--set", "neighbours.shard_size=500", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["n_pairs"] == N_TRAIN - N_FAILED


@pytest.mark.slow
def test_tiny_world_chain(tiny_neighbours):
    """The real chain: world -> embed -> build-index -> precompute-neighbours (all 8 fields)."""
    cfg = tiny_neighbours
    world = json.loads((cfg.paths.world / "world.json").read_text())
    info = json.loads((cfg.paths.index / "info.json").read_text())
    planted = {d["memory_row"] for d in world["eval_duplicates_in_memory"]}
    memory_ids = set(np.load(cfg.paths.index / "memory_ids.npy").tolist())
    assert info["n_removed_eval_duplicates"] == len(planted) and not planted & memory_ids
    assert info["n"] >= 0.9 * info["n_memory_success"]            # ordinary items are kept
    manifest, tables = _all_rows(cfg.paths.neighbours / "tensors")
    assert manifest.info["fields"] == list(ALL_FIELDS)
    train = open_split(cfg.paths.embedded("train"))
    expected = sum(train.manifest.counts.get("success", 0) for _ in [0])
    got = np.concatenate([t.column("id").to_numpy() for t in tables])
    assert len(got) == len(set(got.tolist())) == expected == manifest.counts["total"]
    ids = pq.read_table(cfg.paths.neighbours / "ids" / manifest.shards[0])
    assert (np.stack(ids.column("v_img_ids").to_numpy(zero_copy_only=False)) >= 0).mean() > 0.99
