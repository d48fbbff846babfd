"""embed_splits on the generated world (the ``tiny_embedded`` session fixture) and a real kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.clip import model_identity, resolve_model_spec
from reco.formats import STATUS_OK, Manifest, decode_vectors


def test_world_splits_embedded(tiny_embedded):
    cfg = tiny_embedded
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    for split in ("memory", "train", "test"):
        folder = cfg.paths.embedded(split)
        manifest = Manifest.read(folder, kind="embedded")
        urls = pq.read_table(cfg.paths.urls(split))
        table = pa.concat_tables([pq.read_table(p) for p in manifest.shard_paths(folder)])
        assert table.num_rows == urls.num_rows == sum(manifest.counts.values())
        assert table.column("id").to_pylist() == list(range(urls.num_rows))
        assert table.column("url").to_pylist() == urls.column("url").to_pylist()
        assert table.column("label").to_pylist() == urls.column("label").to_pylist()
        assert manifest.info["model_id"] == model_identity(model, pretrained)   # what, not where
        assert manifest.counts["refused"] == 0                 # loopback allowed for the world
        ok = table.filter(pa.compute.equal(table.column("status"), STATUS_OK))
        assert ok.num_rows >= 0.9 * urls.num_rows
        emb = decode_vectors(ok.column("image_emb"), manifest.info["dim"])
        assert abs(float((emb ** 2).sum(axis=1).mean()) - 1) < 1e-2
        failed = table.filter(pa.compute.not_equal(table.column("status"), STATUS_OK))
        assert all(failed.column("error_message").to_pylist())


@pytest.mark.slow
def test_rerun_after_a_real_kill_resumes_without_duplicates(embed_corpus, embed_model, tmp_path):
    """Kill the job (SIGKILL) once its first shard is on disk, rerun, count ids."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reco.cli", "embed-memory", "--workdir", str(tmp_path / "run"),
           "--input", str(embed_corpus.urls),
           "--output", str(out), "--model", embed_model, "--set", "embed.shard_size=3",
           "--set", "embed.timeout=2", "--set", "embed.allow_networks=127.0.0.0/8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    try:
        deadline = time.time() + 240
        while not list(out.glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = sorted(p.name for p in out.glob("part-*.parquet"))
    n = pq.read_metadata(embed_corpus.urls).num_rows
    shards = -(-n // 3)
    assert 1 <= len(first) < shards, "the kill should land mid-run"
    assert subprocess.run(cmd, capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          timeout=600).returncode == 0
    manifest = Manifest.read(out)
    assert len(manifest.shards) == shards
    ids = pa.concat_tables([pq.read_table(p) for p in manifest.shard_paths(out)]).column("id").to_pylist()
    assert sorted(ids) == list(range(n))
