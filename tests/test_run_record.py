"""The run record (reco/record.py): relocatable runs, option memory, reruns that skip, locks.

* a run moved and copied works from another working directory, by a relative or an absolute
  path: load_model, every stage (embed-memory and the Beam neighbour pass included), evaluate;
* a changed option or input is refused, naming it, and ``--force`` redoes the stage;
* a rerun of the demo on a complete run skips every stage and prints the table again;
* one writer per output: a second ``reco train`` is refused with the first one's pid; a killed
  writer's lock is recovered.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reco import cli
from reco.errors import MismatchError
from reco.pipelines.config import LOOPBACK, EmbedConfig
from reco.record import Record
from tests.fixtures.runs import copy_run


@pytest.fixture(scope="module")
def relocated(tiny_trained, tmp_path_factory):
    """The tiny run copied to a/run, then moved to b/moved, and copied again to c/copy."""
    root = tmp_path_factory.mktemp("relocated")
    copy_run(tiny_trained, root / "a" / "run")
    (root / "b").mkdir()
    os.rename(root / "a" / "run", root / "b" / "moved")
    shutil.copytree(root / "b" / "moved", root / "c" / "copy")
    (root / "elsewhere").mkdir()
    return tiny_trained, root


def test_moved_and_copied_run_work_from_another_folder(relocated, monkeypatch):
    from reco import load_model
    from reco.evaluation.evaluate import evaluate
    from reco.index.build import build_memory_index
    from reco.pipelines.embed_memory import embed_splits
    from reco.pipelines.neighbours import precompute_neighbours
    from reco.trainer.train import train

    original, root = relocated
    monkeypatch.chdir(root / "elsewhere")
    moved = dataclasses.replace(original, workdir=os.path.join("..", "b", "moved"))   # relative
    copy = dataclasses.replace(original, workdir=str(root / "c" / "copy"))            # absolute
    # load_model: same embeddings from the original, the moved run (relative) and the copy
    ref = load_model(original.workdir)
    tokens = ref.tokenizer(["a photo of a bird", "a red bird"])
    images = torch.randn(2, 3, ref.loaded_clip.image_size, ref.loaded_clip.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.encode_text(tokens), ref.encode_image(images)
        for path in (moved.workdir, copy.workdir):
            model = load_model(path)
            assert model.model_id == ref.model_id
            assert torch.equal(model.encode_text(tokens), want[0])
            assert torch.equal(model.encode_image(images), want[1])
        # the heads alone, hub-style: one folder (config JSON + safetensors) with its CLIP spec
        hub = model.save_pretrained(root / "elsewhere" / "hub")
        again = type(model).from_pretrained(hub)
        assert torch.equal(again.encode_text(tokens), want[0])
    # every stage on the moved run: nothing to redo, a deleted shard recomputed identically
    assert all(info["shards_run"] == 0 for info in embed_splits(moved).values())
    assert build_memory_index(moved)["skipped"] is True
    before = Record.read(Path(moved.workdir) / "neighbours", "neighbours")
    for sub in ("ids", "tensors"):
        (Path(moved.workdir) / "neighbours" / sub / "part-00001.parquet").unlink()
    info = precompute_neighbours(moved)                          # the Beam job, one shard
    assert info["computed_shards"] == 1 and info["skipped_shards"] == info["shards"] - 1
    after = Record.read(Path(moved.workdir) / "neighbours", "neighbours")
    assert after.outputs == before.outputs and after.digest() == before.digest()
    assert train(moved)["skipped"] is True
    got, other = (evaluate(c, modes=("off", "both"), gallery=False) for c in (moved, copy))
    assert got["modes"] == other["modes"] and got["model_id"] == ref.model_id
    assert got["modes"]["both"]["zeroshot"]["all"]["top1"] > 0


def test_demo_rerun_skips_every_stage_and_prints_the_table(relocated, capsys):
    import argparse

    from reco import demo

    original, root = relocated
    cfg = dataclasses.replace(original, workdir=str(root / "c" / "copy"),
                              eval=dataclasses.replace(original.eval, modes=("off", "both")))
    demo.run_demo(cfg)                                          # evaluates if not done yet
    capsys.readouterr()
    assert demo.main(cfg, argparse.Namespace(from_stage=None)) == 0
    out = capsys.readouterr().out
    for stage in demo.STAGES:
        assert f"{stage.name} up to date, skipped" in out, out
    assert "| CLIP (frozen) |" in out and "| reco both (v̄, t̄) |" in out


def test_changed_option_or_input_is_refused_and_force_redoes(embed_corpus, embed_model, tmp_path):
    """embed.allow_networks (loopback opened) changed, then a URL list edited with half of the shards deleted: each
    refused, naming the option or the input (never '2 skipped' over refused rows, never two
    versions of a list in one output); --force embeds everything again."""
    from reco.pipelines.embed_memory import embed_urls

    urls, out = tmp_path / "urls.parquet", tmp_path / "out"
    shutil.copy(embed_corpus.urls, urls)
    closed = EmbedConfig(shard_size=8, timeout=3)                      # loopback not allowed
    _, first = embed_urls(str(urls), str(out), model=embed_model, embed_cfg=closed)
    assert first["counts"]["success"] == 0                  # loopback refused without the option
    opened = dataclasses.replace(closed, allow_networks=LOOPBACK)
    with pytest.raises(MismatchError, match=r"option\(s\) embed.allow_networks \(recorded \[\], now "
                                            r"\['127.0.0.0/8'\]\) differ .*`reco embed-memory --force`"):
        embed_urls(str(urls), str(out), model=embed_model, embed_cfg=opened)
    table = pq.read_table(urls)
    captions = [f"edited {c}" for c in table.column("caption").to_pylist()]
    pq.write_table(table.set_column(1, "caption", pa.array(captions)), urls)
    shards = sorted(out.glob("part-*.parquet"))
    for path in shards[::2]:
        path.unlink()
    with pytest.raises(MismatchError, match=r"input\(s\) 0:urls.parquet \(sha256:.* recorded, now "
                                            r"sha256:.*\) changed .*--force"):
        embed_urls(str(urls), str(out), model=embed_model, embed_cfg=closed)
    assert sorted(out.glob("part-*.parquet")) == shards[1::2]          # refused before any work
    _, info = embed_urls(str(urls), str(out), model=embed_model, embed_cfg=opened, force=True)
    assert info["shards_run"] == info["shards"] and info["counts"]["success"] == len(embed_corpus.good)
    got = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    assert all(c.startswith("edited ") for c in got.column("caption").to_pylist())


def _lock_pid(folder: Path, timeout: float = 120) -> int | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = (folder / ".lock").read_text().strip() if (folder / ".lock").exists() else ""
        if text:
            return int(text)
        time.sleep(0.2)
    return None


def test_second_train_is_refused_and_a_killed_runs_lock_recovered(tiny_trained, tmp_path, capsys):
    cfg = copy_run(tiny_trained, tmp_path / "run", parts=("neighbours", "heads"))
    argv = ["train", "--preset", "tiny", "--workdir", cfg.workdir,
            *[f"--set=neighbours.fields={','.join(cfg.neighbours.fields)}"]]
    first = subprocess.Popen([sys.executable, "-m", "reco.cli", *argv, "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert _lock_pid(Path(cfg.workdir) / "heads") == first.pid
        assert first.poll() is None
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"another `reco train` is already running (pid {first.pid})" in err
    finally:
        first.kill()                                     # SIGKILL: no cleanup, the lock file stays
        first.wait()
    assert (Path(cfg.workdir) / "heads" / ".lock").exists()
    assert cli.main(argv) == 0                           # the kernel released the killed run's lock
