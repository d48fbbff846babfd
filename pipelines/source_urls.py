"""Input kind ``urls`` (:mod:`reco.pipelines.inputs`): URL lists, downloaded and embedded.

    ReadUrls -> SafetyFilter -> Download (img2dataset) -> Embed (open_clip)

Rows are grouped into shards of ``embed.shard_size`` by global row number (:mod:`.urls`).
"""
from __future__ import annotations

import apache_beam as beam

from reco.pipelines.download import DownloadShards
from reco.pipelines.embed import EmbedShards
from reco.pipelines.urls import FilterUnsafeUrls, ReadUrlShards, inspect_url_files
from reco.pipelines.urls import num_shards  # noqa: F401  (the kind's shard count)


def inspect(files: list[str], cfg) -> list:
    """Columns checked and rows counted on the driver (:func:`.urls.inspect_url_files`)."""
    return inspect_url_files(files, cfg)


class Source(beam.PTransform):
    """PBegin -> (shard, embedded rows) for every URL-list shard not yet complete."""

    def __init__(self, job):
        super().__init__()
        self.job = job

    def expand(self, pbegin):
        job, cfg = self.job, self.job.cfg
        return (pbegin
                | "ReadUrls" >> ReadUrlShards(job.files, cfg.shard_size, job.skip)
                | "SafetyFilter" >> FilterUnsafeUrls(cfg.allow_networks)
                | "Download" >> DownloadShards(job.image_size, cfg)
                | "Embed" >> embed_transform(job))


def embed_transform(job) -> EmbedShards:
    cfg = job.cfg
    return EmbedShards(job.model, job.pretrained, batch_size=cfg.batch_size,
                       torch_threads=cfg.torch_threads, device=cfg.device or "cpu",
                       precision=cfg.precision or "fp32", decode_workers=cfg.decode_workers)
