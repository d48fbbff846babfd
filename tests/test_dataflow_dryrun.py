"""Both Beam jobs of reco build for Google Cloud Dataflow offline (issue 8).

``--runner=DataflowRunner --dry_run=True`` with a made-up project, region and gs:// temp
location translates the whole pipeline into a Dataflow job (runner API proto, Docker
environment, the staged worker package built from the repo's setup.py) and returns before any
request: nothing is contacted, no credentials are needed. Needs the ``gcp`` extra
(apache-beam[gcp]), which the ``test`` extra installs.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                    reason="apache-beam[gcp] (the gcp extra) is not installed")

from reco.pipelines import runners  # noqa: E402

DRY_RUN = ["--runner=DataflowRunner", "--project=reco-dry-run", "--region=europe-west4",
           "--temp_location=gs://reco-dry-run-bucket/tmp", "--dry_run=True"]


def _transform_names(result) -> set[str]:
    return {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}


def _run(options, build) -> object:
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def test_dataflow_options_preset():
    options = runners.pipeline_options(DRY_RUN).get_all_options()
    assert options["runner"] == "DataflowRunner"
    assert options["setup_file"] == str(runners.REPO_SETUP) and runners.REPO_SETUP.is_file()


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, embed_model):
    root = tmp_path_factory.mktemp("dataflow_embed")
    n = 12
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.png" for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}), root / "urls.parquet")
    return root, root / "urls.parquet"


def test_embed_memory_builds_for_dataflow(url_list, embed_model):
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import EmbedMemory, embed_urls, pipeline_options, plan_job

    root, urls = url_list
    cfg = EmbedConfig(shard_size=4, label_col=None)
    _, info = embed_urls(str(urls), str(root / "out"), model=embed_model, embed_cfg=cfg,
                         beam_options=DRY_RUN)                 # the public entry point
    assert info["shards_run"] == 3 and info["metrics"] == {}
    job = plan_job(str(urls), str(root / "out2"), model=embed_model, pretrained=None, embed_cfg=cfg)
    result = _run(pipeline_options(cfg, DRY_RUN), lambda p: p | "EmbedMemory" >> EmbedMemory(job))
    names = _transform_names(result)
    for step in ("ReadUrls", "SafetyFilter", "Download", "Embed", "Write"):
        assert f"EmbedMemory/{step}" in names, sorted(names)
    environment = next(iter(result.job.proto_pipeline.components.environments.values()))
    staged = [d.role_payload for d in environment.dependencies]
    assert any(b"workflow.tar.gz" in p for p in staged), staged     # reco's sdist for the workers


def test_precompute_neighbours_builds_for_dataflow(tmp_path):
    from reco.index.build import build_memory_index
    from reco.embedded import open_split
    from reco.pipelines.neighbours.shards import plan_shards
    from reco.pipelines.neighbours.job import PrecomputeNeighbours, make_settings
    from tests.fixtures.index import make_synthetic

    cfg, _ = make_synthetic(tmp_path, n_memory=400, n_train=300, n_test=40, dim=32, n_clusters=8)
    cfg = dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, shard_size=100))
    build_memory_index(cfg)
    train = open_split(cfg.paths.embedded("train"))
    settings, specs = make_settings(cfg, train.dim), plan_shards(train, cfg.neighbours.shard_size)
    result = _run(runners.pipeline_options(DRY_RUN),
                  lambda p: p | "ShardSpecs" >> beam.Create(specs) | "Neighbours" >> PrecomputeNeighbours(settings))
    names = _transform_names(result)
    assert "ShardSpecs" in names and "Neighbours" in names and any(n.startswith("Neighbours/") for n in names)
    assert not any(cfg.paths.neighbours.glob("**/part-*.parquet"))      # built, not run
