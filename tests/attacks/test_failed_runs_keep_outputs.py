"""A stage that fails never removes the completed output of an earlier run before its
replacement is ready (RELIABILITY.md, round two item 10).

evaluate, build-index and train are rerun over a complete output and made to fail (a missing
input, or a failure injected into the last step before writing); the earlier output must be
there afterwards, byte for byte, and readable by the next stage.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from reco.errors import RecoError
from tests.test_evaluation_query import workdir  # noqa: F401 - the small real run (fixture)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_failed_evaluate_keeps_the_previous_results(workdir, tmp_path, monkeypatch):  # noqa: F811
    from reco.evaluation import evaluate as evaluate_mod
    from reco.evaluation import gallery

    cfg = workdir[0]
    evaluate_mod.evaluate(cfg, modes=("off", "both"))
    before = _digests(cfg.paths.eval)
    assert {"results.json", "report.md", "zeroshot.png", "gallery.html"} <= set(before)
    with pytest.raises(RecoError, match="heads"):              # a missing input: fails early
        evaluate_mod.evaluate(cfg, heads_dir=tmp_path / "no-heads")
    assert _digests(cfg.paths.eval) == before

    def broken_gallery(*args, **kwargs):                      # fails after every metric is computed
        raise OSError("disk full while writing the gallery")

    monkeypatch.setattr(gallery, "write_gallery", broken_gallery)
    with pytest.raises(OSError, match="disk full"):
        evaluate_mod.evaluate(cfg, modes=("off", "both"))
    assert _digests(cfg.paths.eval) == before                 # no temporaries left either


def test_failed_build_index_keeps_the_previous_index(tmp_path, monkeypatch):
    from reco.index import build
    from reco.index.memory import Memory
    from tests.fixtures.index import make_synthetic

    cfg, _ = make_synthetic(tmp_path, n_memory=300, n_train=20, n_test=20, dim=16, n_clusters=8)
    build.build_memory_index(cfg)
    before = _digests(cfg.paths.index)
    real, calls = build.train_index, []

    def fails_on_the_text_index(vectors, plan, index_cfg, *rest):
        calls.append(plan.key)
        if len(calls) == 2:
            raise RuntimeError("autofaiss: out of memory")
        return real(vectors, plan, index_cfg, *rest)

    monkeypatch.setattr(build, "train_index", fails_on_the_text_index)
    with pytest.raises(RuntimeError, match="out of memory"):
        build.build_memory_index(cfg, force=True)
    assert _digests(cfg.paths.index) == before
    assert Memory.load(cfg.paths.index).n == len(Memory.load(cfg.paths.index).ids) > 0


def test_failed_fresh_train_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    import torch

    from reco import config as config_lib
    from reco.trainer import train as train_mod
    from reco.trainer.checkpoint import latest_checkpoint
    from tests.fixtures.trainer import write_synthetic_workdir

    torch.set_num_threads(1)
    write_synthetic_workdir(tmp_path, n=256, dim=16, k=4, rows_per_shard=128)
    cfg = config_lib.override(config_lib.preset("tiny", workdir=str(tmp_path)), [
        "train.batch_size=32", "train.k=4", "train.head.heads=2", "train.warmup_steps=1",
        "train.shuffle_buffer=64", "train.steps=4", "train.checkpoint_every=2"])
    train_mod.train(cfg)
    heads = cfg.paths.heads
    before = {p.name: _digests(p) for p in (heads / "checkpoints").iterdir()}
    weights = _digests(heads)

    def fails(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(train_mod, "train_step", fails)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train_mod.train(cfg, force=True)                      # fresh run (no --resume)
    assert {p.name: _digests(p) for p in (heads / "checkpoints").iterdir()} == before
    assert latest_checkpoint(heads).name == "step-000004"
    assert _digests(heads) == weights                        # heads.json, weights, curve
