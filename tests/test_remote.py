"""Stage inputs and outputs on fsspec paths (reco.remote), with ``memory://`` as the bucket.

The README recipe for real data (embed-memory --output URL, then build-index --memory URL ...)
runs on ``memory://bucket/reco/...``: each stage reads its input from the bucket and publishes its
output there; the work directory is only the local cache. A protocol whose package is not
installed is one line naming the extra that installs it.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fsspec
import pytest

from reco.errors import ConfigError
from reco.remote import cache_folder, check_paths, mirror, publish


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{id(fs)}-{len(fs.store)}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_mirror_and_publish_round_trip_markers_last(tmp_path, bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "part-00000.parquet").write_bytes(b"a" * 10)
    (src / "sub" / "x.npy").write_bytes(b"b" * 5)
    (src / "manifest.json").write_text("{}")
    (src / ".part-00001.parquet.tmp-1234abcd").write_bytes(b"half")       # a killed writer's
    order = []
    fs = fsspec.filesystem("memory")
    original = fs.mv
    fs.mv = lambda a, b, **kw: (order.append(Path(b).name), original(a, b, **kw))[1]
    try:
        assert publish(src, f"{bucket}/out")["files"] == 3
    finally:
        fs.mv = original
    assert order[-1] == "manifest.json" and len(order) == 3
    got = mirror(f"{bucket}/out", tmp_path / "dest")
    assert got["fetched"] == 3
    assert (tmp_path / "dest" / "sub" / "x.npy").read_bytes() == b"b" * 5
    assert not list((tmp_path / "dest").glob(".*tmp*"))
    again = mirror(f"{bucket}/out", tmp_path / "dest")
    assert again["fetched"] == 1                      # only the marker, which is always refreshed
    with pytest.raises(Exception, match="no such folder"):
        mirror(f"{bucket}/nothing", tmp_path / "other", option="memory")
    assert cache_folder("w", "gs://b/reco/index") == Path("w/cache/gs_b_reco_index")


def test_missing_protocol_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    from reco.cli import main

    if importlib.util.find_spec("s3fs") is not None:       # installed here: simulate its absence
        import fsspec.core

        real = fsspec.core.url_to_fs

        def no_s3(url, **kw):
            if str(url).startswith("s3://"):
                raise ImportError("Install s3fs to access S3")
            return real(url, **kw)
        monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3)
    with pytest.raises(ConfigError, match=r"reco-clip\[s3\]"):
        check_paths(input=["s3://bucket/laion/part-0.parquet"])
    argv = ["embed-memory", "--preset", "tiny", "--workdir", str(tmp_path),
            "--input", "s3://bucket/laion/*.parquet", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3fs" in err[0] and "pip install 'reco-clip[s3]'" in err[0], err
    assert main(["build-index", "--preset", "tiny", "--workdir", str(tmp_path),
                 "--memory", "s3://bucket/reco/memory"]) == 2
    assert "--memory s3://bucket/reco/memory" in capsys.readouterr().err


def _upload(local: Path, url: str) -> None:
    publish(local, url)


def test_build_index_reads_the_memory_from_a_bucket_and_publishes_the_index(tiny_indexed, bucket,
                                                                            tmp_path, capsys):
    """The README recipe's second step with the memory only on the bucket: no 'no manifest'."""
    from reco.cli import main

    cfg = tiny_indexed
    for split in ("memory", "test"):
        _upload(cfg.paths.embedded(split), f"{bucket}/reco/{split}")
    work = tmp_path / "laion"
    argv = ["build-index", "--preset", "tiny", "--workdir", str(work),
            "--memory", f"{bucket}/reco/memory", "--test", f"{bucket}/reco/test",
            "--output", f"{bucket}/reco/index"]
    assert main(argv) == 0, capsys.readouterr().err
    fs = fsspec.filesystem("memory")
    remote = json.loads(fs.cat(f"{bucket[len('memory://'):]}/reco/index/info.json"))
    local = json.loads((cfg.paths.index / "info.json").read_text())
    for key in ("n", "dim", "model_id", "keys", "n_removed_eval_duplicates"):
        assert remote[key] == local[key], key
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket[len('memory://'):]}/reco/index",
                                                       detail=False)) == sorted(
        p.name for p in cfg.paths.index.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_whole_chain_through_a_bucket(tiny_trained, bucket, tmp_path, capsys):
    """embed-memory -> memory:// -> build-index -> precompute-neighbours -> train -> evaluate,
    every stage reading its input from the bucket and publishing its output there; the heads
    trained this way score what the work-directory chain's heads score."""
    from reco.cli import main
    from reco.evaluation.evaluate import evaluate

    cfg = tiny_trained
    b = f"{bucket}/reco"
    common = ["--preset", "tiny", "--workdir", str(tmp_path / "laion")]
    model = ["--model", f"local-dir:{cfg.paths.base_clip}"]
    assert main(["embed-memory", *common, *model, "--set", "embed.allow_networks=127.0.0.0/8",
                 "--input", str(cfg.paths.urls("memory")), "--output", f"{b}/memory"]) == 0
    for split in ("train", "test"):
        _upload(cfg.paths.embedded(split), f"{b}/{split}")
    steps = [["build-index", "--memory", f"{b}/memory", "--test", f"{b}/test", "--output", f"{b}/index"],
             ["precompute-neighbours", "--train", f"{b}/train", "--index", f"{b}/index",
              "--output", f"{b}/neighbours"],
             ["train", "--neighbours", f"{b}/neighbours", "--out", f"{b}/heads"]]
    for step in steps:
        assert main([step[0], *common, *model, *step[1:]]) == 0, capsys.readouterr().err
    # build-index --test mirrored the embedded test split into the work directory: evaluate it
    assert (tmp_path / "laion" / "embeddings" / "test" / "manifest.json").is_file()
    assert main(["evaluate", *common, *model, "--heads", f"{b}/heads", "--memory", f"{b}/index",
                 "--modes", "off,both", "--classnames", str(cfg.paths.world / "classnames.txt"),
                 "--output", f"{b}/eval"]) == 0
    fs = fsspec.filesystem("memory")
    res = json.loads(fs.cat(f"{b[len('memory://'):]}/eval/results.json"))
    ref = evaluate(cfg, modes=("off", "both"), gallery=False)
    for mode in ("off", "both"):
        assert abs(res["modes"][mode]["zeroshot"]["all"]["top1"]
                   - ref["modes"][mode]["zeroshot"]["all"]["top1"]) <= 3.0, mode
