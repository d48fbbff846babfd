"""REACT outside the generated world: retrieve -> download -> stream-train -> evaluate from foreign
inputs (an img2dataset-style webdataset download, a URL list served on loopback by a plain HTTP
server), with ``reco.world`` never imported (checked in a subprocess)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.react_foreign_run import config

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory):
    """prepare + retrieve + download (reuse) + 40 streamed steps + evaluation, in a subprocess."""
    root = tmp_path_factory.mktemp("react_foreign")
    result = _run([sys.executable, "-m", "tests.react_foreign_run", "all", str(root), "40"])
    return root, result


def test_react_end_to_end_from_a_webdataset_download(foreign_run):
    from reco.react.model import ReactModel

    root, result = foreign_run
    assert result["world_imported"] is False
    table = pq.read_table(root / "work" / "react" / "customisation.parquet")
    assert {"url", "caption", "key", "class_id"} <= set(table.column_names)
    assert len(set(table.column("url").to_pylist())) == table.num_rows       # deduplicated
    info = json.loads((root / "work" / "react" / "retrieval.json").read_text())
    assert sum(info["per_class_counts"].values()) == table.num_rows
    down = json.loads((root / "work" / "react" / "shards" / "download.json").read_text())
    assert down["status_counts"] == {"success": table.num_rows} and down["mode"] == "reuse"
    train = result["info"]
    assert train["image_source"] == "shards" and train["pairs"] == table.num_rows
    zs = train["zeroshot"]
    assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 25, zs
    assert ReactModel.load(root / "model").meta["steps_done"] == 40
    assert (root / "model" / "tb").is_dir()


def test_streamed_training_resumes_exactly(foreign_run, tmp_path):
    """6 steps straight == 3 steps, checkpoint, resume for 3 (2 DataLoader workers, shuffled)."""
    from safetensors.torch import load_file

    from reco.react.train import react_train

    root, _ = foreign_run
    torch.set_num_threads(1)
    cfg = config(root, 6, checkpoint_every=3, workers=2, shuffle_buffer=16, log_every=1)
    react_train(cfg, out_dir=tmp_path / "m", evaluate=False)
    straight = load_file(tmp_path / "m" / "gated.safetensors")
    (tmp_path / "m" / "gated.safetensors").unlink()
    cfg = config(root, 6, checkpoint_every=3, workers=2, shuffle_buffer=16, resume=True)
    info = react_train(cfg, out_dir=tmp_path / "m", evaluate=False)
    assert info["start_step"] == 3
    resumed = load_file(tmp_path / "m" / "gated.safetensors")
    assert set(straight) == set(resumed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_react_download_over_loopback_records_failures(foreign_run, tmp_path):
    """The set's URLs on a plain loopback HTTP server (not the world's): img2dataset behind the
    network guard downloads and resizes them into tar shards; a 404 and a refused URL are rows
    with their status."""
    import dataclasses

    from reco.react.download import react_download
    from reco.react.shards import ShardStream, list_tars

    root, _ = foreign_run
    handler = functools.partial(_Quiet, directory=str(root / "work" / "world"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        table = pq.read_table(root / "work" / "react" / "customisation.parquet").slice(0, 12)
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        urls = [base + u.split("/", 3)[3] for u in table.column("url").to_pylist()]
        urls[3], urls[5] = base + "images/memory/missing.png", "file:///etc/passwd"
        table = table.set_column(table.column_names.index("url"), "url", pa.array(urls))
        pq.write_table(table, tmp_path / "set.parquet")
        cfg = config(root)
        cfg = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, allow_networks=("127.0.0.0/8",)),
                                  react=dataclasses.replace(cfg.react, shard_size=5, reuse=None))
        out, info = react_download(cfg, customisation=tmp_path / "set.parquet",
                                   out=tmp_path / "shards", image_size=32)
    finally:
        server.shutdown()
    assert info["status_counts"] == {"success": 10, "failed_to_download": 1, "refused": 1}, info
    results = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("0*.parquet"))])
    by_key = {r["key"]: r for r in results.to_pylist()}
    keys = table.column("key").to_pylist()
    assert "404" in by_key[keys[3]]["error_message"] and by_key[keys[5]]["status"] == "refused"
    assert len(list_tars(out)) == 3
    stream = ShardStream(list_tars(out), lambda im: torch.tensor(im.size), shuffle_buffer=0)
    sizes = [px.tolist() for (px, _), _ in zip(stream.samples(), range(10))]
    assert len(sizes) == 10 and all(max(s) == 32 for s in sizes)


@pytest.mark.slow
def test_react_ddp_two_processes_gloo(foreign_run, tmp_path):
    """torchrun, 2 processes, gloo on CPU, streaming the same shards."""
    root, _ = foreign_run
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", "29531", "-m", "tests.react_foreign_run", "train", str(root), "40"])
    train = result["info"]
    assert train["world_size"] == 2 and result["world_imported"] is False
    zs = train["zeroshot"]
    assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 25, zs


def test_caption_targets_match_the_text_tower_and_are_embedded_once(foreign_run, tmp_path):
    """The stream's targets are the locked text tower's embeddings of each sample's caption,
    embedded once per (tar, model) and looked up by key; a corrupt targets file names itself."""
    import numpy as np

    from reco.errors import FormatError
    from reco.react.data import encode_captions
    from reco.react.retrieve import load_frozen_clip
    from reco.react.shards import ShardStream, list_tars
    from reco.react.targets import CaptionTargets, tar_captions

    root, _ = foreign_run
    cfg = config(root, 1)
    clip = load_frozen_clip(cfg)
    tars = list_tars(root / "work" / "react" / "shards")
    calls = []

    def encode(captions):
        calls.append(len(captions))
        return encode_captions(clip, captions)

    cache = CaptionTargets(tmp_path / "targets", clip.model_id)
    assert cache.build(tars, encode, rank=0, world=2) == len(tars[0::2])
    assert cache.build(tars, encode, rank=1, world=2) == len(tars[1::2])
    assert cache.build(tars, encode) == 0 and len(calls) == len(tars)            # once per tar
    stream = ShardStream(tars, clip.preprocess, shuffle_buffer=8, batch=4, targets=cache)
    pixels, targets = next(iter(stream))
    keys, captions = zip(*[tar_captions(t) for t in tars])
    by_key = dict(zip(sum(keys, []), sum(captions, [])))
    names = [c for (_, c), _ in zip(ShardStream(tars, clip.preprocess, shuffle_buffer=8).samples(), range(4))]
    assert set(names) <= set(by_key.values())
    expected = encode_captions(clip, names)
    assert pixels.shape[0] == 4 and targets.dtype == torch.float32
    np.testing.assert_allclose(targets.numpy(), expected.numpy(), atol=1e-5)
    bad = cache.path(tars[0])
    bad.write_bytes(b"not parquet")
    with pytest.raises(FormatError, match=str(bad.name)):
        CaptionTargets(tmp_path / "targets", clip.model_id).lookup(tars[0], keys[0][0])
    assert CaptionTargets(tmp_path / "targets", "another-model").path(tars[0]) != bad


def test_reused_images_keep_their_bytes(foreign_run):
    """react-download with react.reuse copies each image as downloaded (the world's PNGs stay
    PNG, byte for byte): a second lossy encoding would shift the colours of small images."""
    import webdataset as wds

    from reco.react.download import image_member

    root, _ = foreign_run
    source = {}
    for s in wds.DataPipeline(wds.SimpleShardList([str(p) for p in sorted((root / "download").glob("*.tar"))]),
                              wds.tarfile_to_samples()):
        source[json.loads(s["json"])["url"]] = s["png"]
    copied = list(wds.DataPipeline(wds.SimpleShardList(
        [str(p) for p in sorted((root / "work" / "react" / "shards").glob("*.tar"))]), wds.tarfile_to_samples()))
    assert copied and all("png" in s and "jpg" not in s for s in copied)
    assert all(s["png"] == source[json.loads(s["json"])["url"]] for s in copied)
    gif = _gif()
    suffix, data = image_member(gif)
    assert suffix == "png" and data[:4] == b"\x89PNG"
    assert image_member(data) == ("png", data)


def _gif() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()
