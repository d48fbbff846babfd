"""Runner portability of reco's Beam jobs (issue 8).

* Engine presets of :mod:`reco.pipelines.runners`: aliases, required options, refusals.
* Each job (embed-memory on a slice of the tiny world's memory URL list, precompute-neighbours
  on the tiny world's index) run three ways: DirectRunner in_memory (the reference), DirectRunner
  multi_processing with 2 workers, and PortableRunner submitting over the portable Job API to
  Beam's job service in a separate process on 127.0.0.1. Outputs must be identical, and every
  run's row count and id set is checked against the input, so a silently lost block fails.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.errors import ConfigError
from reco.pipelines import runners

N_URLS, SHARD = 60, 20
DIRECT = ["--runner=DirectRunner"]
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


# --------------------------------------------------------------------------------------------
# engine presets (no pipeline runs)
# --------------------------------------------------------------------------------------------

def _opts(args):
    return runners.pipeline_options(args).get_all_options(retain_unknown_options=True)


def test_aliases_resolve_to_runners():
    assert _opts([])["runner"] == runners.FN_API_RUNNER              # DirectRunner: FnApiRunner
    assert _opts(["--runner=direct"])["runner"] == runners.FN_API_RUNNER
    portable = _opts(["--runner=portable", "--job_endpoint=127.0.0.1:8099"])
    assert (portable["runner"], portable["environment_type"]) == ("PortableRunner", "LOOPBACK")
    assert _opts(["--runner=PortableRunner", "--job_endpoint=127.0.0.1:1",
                  "--environment_type=PROCESS"])["environment_type"] == "PROCESS"
    assert _opts(["--runner=spark", "--job_endpoint=127.0.0.1:8099"])["runner"] == "SparkRunner"
    assert _opts(["--runner=FlinkRunner", "--flink_job_server_jar=/x.jar"])["runner"] == "FlinkRunner"
    dataflow = _opts(["--runner=dataflow", "--project=p", "--region=r", "--temp_location=gs://b/t"])
    assert dataflow["runner"] == "DataflowRunner"
    assert dataflow["setup_file"] == str(runners.REPO_SETUP)           # ships reco to the workers
    assert _opts(["--runner=dataflow", "--project=p", "--region=r", "--temp_location=gs://b/t",
                  "--sdk_container_image=img"]).get("setup_file") is None


@pytest.mark.parametrize("args, match", [
    (["--runner=DataflowRunner"], "needs --project; --region; --temp_location"),
    (["--runner=dataflow", "--project=p", "--region=r", "--temp_location=/tmp/x"], "gs://"),
    (["--runner=SparkRunner"], "--job_endpoint or --spark_job_server_jar"),
    (["--runner=flink"], "--job_endpoint or --flink_job_server_jar"),
    (["--runner=PortableRunner"], "needs --job_endpoint"),
    (["--runner=DaskRunner"], "finish_bundle"),
    (["--runner=NoSuchRunner"], "unknown runner"),
    (["--direct_running_mode=multi_threading"], "multi_threading"),
])
def test_missing_or_refused_options_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        runners.pipeline_options(args)


def test_pipeline_options_round_trip():
    options = runners.pipeline_options(["--runner=portable", "--job_endpoint=127.0.0.1:1"])
    again = runners.pipeline_options(options)                  # PipelineOptions accepted too
    assert again.get_all_options()["job_endpoint"] == "127.0.0.1:1"


# --------------------------------------------------------------------------------------------
# Beam's job service in another process, on 127.0.0.1
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    port_file = tmp_path_factory.mktemp("job_service") / "port"
    log = open(port_file.with_name("log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "reco.pipelines.runners", "job-service",
                             "--port_file", str(port_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"job service did not start: {port_file.with_name('log').read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _portable(endpoint: str) -> list[str]:
    return ["--runner=PortableRunner", f"--job_endpoint={endpoint}", "--environment_type=LOOPBACK"]


def _table(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts, f"no shards in {folder}"
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table.replace_schema_metadata(None).sort_by("id")


# --------------------------------------------------------------------------------------------
# embed-memory
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embed_runs(tiny_world, tmp_path_factory, job_service):
    """The first N_URLS rows of the world's memory URL list embedded three ways."""
    from reco.clip import resolve_model_spec
    from reco.pipelines.embed_memory import embed_urls

    cfg = tiny_world
    root = tmp_path_factory.mktemp("embed_runs")
    urls = root / "urls.parquet"
    pq.write_table(pq.read_table(cfg.paths.urls("memory")).slice(0, N_URLS), urls)
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    embed_cfg = dataclasses.replace(cfg.embed, allow_networks=("127.0.0.0/8",), shard_size=SHARD, torch_threads=1)
    runs = {}
    for name, flags in (("direct", DIRECT), ("multi_processing", MULTI),
                        ("portable", _portable(job_service))):
        _, info = embed_urls(str(urls), str(root / name), model=model, pretrained=pretrained,
                             embed_cfg=embed_cfg, beam_options=flags)
        runs[name] = (root / name, info)
    return runs


@pytest.mark.parametrize("mode", ["direct", "multi_processing", "portable"])
def test_embed_rows_and_ids_complete(embed_runs, mode):
    folder, info = embed_runs[mode]
    table = _table(folder)
    assert table.num_rows == N_URLS == info["rows"]
    assert table.column("id").to_pylist() == list(range(N_URLS))        # none lost, none doubled
    assert info["complete"] and info["shards_run"] == N_URLS // SHARD
    assert sum(info["counts"].values()) == N_URLS
    assert info["counts"]["success"] > N_URLS // 2


@pytest.mark.parametrize("mode", ["multi_processing", "portable"])
def test_embed_outputs_identical_to_direct(embed_runs, mode):
    reference, other = _table(embed_runs["direct"][0]), _table(embed_runs[mode][0])
    assert other.schema.equals(reference.schema)
    assert other.equals(reference)
    manifests = [json.loads((embed_runs[m][0] / "manifest.json").read_text()) for m in ("direct", mode)]
    assert manifests[0]["counts"] == manifests[1]["counts"]
    assert manifests[0]["shards"] == manifests[1]["shards"]


def test_portable_job_reports_counters(embed_runs):
    direct, portable = embed_runs["direct"][1]["metrics"], embed_runs["portable"][1]["metrics"]
    assert portable and portable == direct


# --------------------------------------------------------------------------------------------
# precompute-neighbours
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def neighbour_runs(tiny_indexed, tmp_path_factory, job_service):
    """precompute_neighbours three ways, each in its own work directory that links the tiny
    world's embeddings and index."""
    from reco.pipelines.neighbours import precompute_neighbours

    root = tmp_path_factory.mktemp("neighbour_runs")
    runs = {}
    for name, flags in (("direct", DIRECT), ("multi_processing", MULTI),
                        ("portable", _portable(job_service))):
        workdir = root / name
        workdir.mkdir()
        for sub in ("embeddings", "index"):
            os.symlink(getattr(tiny_indexed.paths, sub), workdir / sub)
        cfg = dataclasses.replace(tiny_indexed, workdir=str(workdir), neighbours=dataclasses.replace(
            tiny_indexed.neighbours, shard_size=500))
        runs[name] = (cfg, precompute_neighbours(cfg, beam_options=flags))
    return runs


def _train_ids(cfg) -> list[int]:
    from reco.embedded import open_split, read_split

    return sorted(int(i) for i in read_split(open_split(cfg.paths.embedded("train")),
                                             modalities=())["id"])


@pytest.mark.parametrize("mode", ["direct", "multi_processing", "portable"])
def test_neighbours_rows_and_ids_complete(neighbour_runs, mode):
    cfg, info = neighbour_runs[mode]
    expected = _train_ids(cfg)
    for sub in ("ids", "tensors"):
        table = _table(cfg.paths.neighbours / sub)
        assert table.num_rows == len(expected) == info["n_pairs"]
        assert table.column("id").to_pylist() == expected
    assert info["computed_shards"] == info["shards"] > 1


@pytest.mark.parametrize("mode", ["multi_processing", "portable"])
def test_neighbours_outputs_identical_to_direct(neighbour_runs, mode):
    reference, other = neighbour_runs["direct"][0], neighbour_runs[mode][0]
    for sub in ("ids", "tensors"):
        assert _table(other.paths.neighbours / sub).equals(_table(reference.paths.neighbours / sub))
        names = [sorted(p.name for p in (c.paths.neighbours / sub).glob("part-*")) for c in (reference, other)]
        assert names[0] == names[1]
