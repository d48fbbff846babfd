"""`reco bench --set/--model/--device` reach the benches that use them, others are refused
(issue 21). Unit level: the benches' measuring functions are replaced, nothing is timed."""
from __future__ import annotations

import pytest

from reco import cli
from reco.bench import embed as bench_embed_mod
from reco.bench import index as bench_index_mod
from reco.bench import options as bench_options


def test_set_reaches_the_index_bench_config(tmp_path, monkeypatch):
    seen = {}

    def fake_bench_index(out_dir, quick=True, options=None):
        seen["options"] = options
        seen["cfg"] = bench_index_mod._cfg(tmp_path / "work", options)
        return {}

    monkeypatch.setattr(bench_index_mod, "bench_index", fake_bench_index)
    rc = cli.main(["bench", "--only", "index", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                   "--set", "index.target_recall=0.9", "--set", "neighbours.batch_size=1024"])
    assert rc == 0
    assert seen["options"] == {"index.target_recall": 0.9, "neighbours.batch_size": 1024}
    assert seen["cfg"].index.target_recall == 0.9 and seen["cfg"].neighbours.batch_size == 1024
    assert '"index.target_recall": 0.9' in (tmp_path / "out" / "results.json").read_text()


def test_measured_subprocesses_get_the_same_options(tmp_path):
    bench_options.save(tmp_path, {"index.target_recall": 0.9})
    assert bench_index_mod._cfg(tmp_path).index.target_recall == 0.9       # as `raw`/`pass` read it
    assert bench_index_mod._cfg(tmp_path / "other").index.target_recall == 0.95


def test_model_device_precision_reach_the_embed_bench(tmp_path, monkeypatch):
    import json

    from reco.bench import paired as pb

    specs, argv = [], []

    def fake_prepare(work, model, pretrained, n, batch, source_px, opt):
        spec = {**bench_embed_mod.spec_of(model, pretrained, n, batch, opt), "image_size": 224}
        specs.append(spec)
        work.mkdir(parents=True, exist_ok=True)
        (work / "spec.json").write_text(json.dumps(spec))
        return work / "spec.json"

    def fake_paired(a, b, rounds):
        argv.append((a, b, rounds))
        return pb.summarise([{"a": {"rate": 1.0}, "b": {"rate": 1.0}, "ratio": 1.0, "load_before": 0.0,
                              "load_after": 0.0}])

    monkeypatch.setattr(bench_embed_mod, "prepare", fake_prepare)
    monkeypatch.setattr(bench_embed_mod, "paired", fake_paired)
    bench_embed_mod.bench_embed(tmp_path, options={"clip.model": "ViT-B-32", "clip.device": "cpu",
                                                   "clip.precision": "bf16", "embed.batch_size": 32,
                                                   "embed.decode_workers": 3})
    (spec,) = specs                                  # only the model asked for, not the presets
    assert (spec["model"], spec["pretrained"], spec["batch"]) == ("ViT-B-32", None, 32)
    assert (spec["device"], spec["precision"], spec["decode_workers"]) == ("cpu", "bf16", 3)
    ((a, b, rounds),) = argv                         # the children read that spec
    assert (a[-2], b[-2]) == ("stage", "raw") and a[-1] == b[-1] and a[-1].endswith("spec.json")


def test_option_a_bench_cannot_use_is_refused(tmp_path, capsys):
    rc = cli.main(["bench", "--only", "index", "--model", "ViT-B-32", "--workdir", str(tmp_path / "run"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "clip.model does not apply to the index benchmark" in err
    assert "reco bench --only embed" in err
    assert not (tmp_path / "out").exists()                     # refused before any work
    rc = cli.main(["bench", "--only", "import", "--set", "train.steps=5", "--workdir", str(tmp_path / "run"),
                   "--out", str(tmp_path / "out")])
    assert rc == 2 and "train.steps does not apply to the import benchmark" in capsys.readouterr().err


def test_gpu_bench_says_skipped_without_a_gpu(tmp_path):
    """`make bench-gpu` on a CPU machine: exit 0, "no GPU: skipped", results written."""
    import json
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the benchmark would run")
    done = subprocess.run([sys.executable, "-m", "reco.bench.gpu", "--size", "tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no GPU: skipped" in done.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["skipped"].startswith("no GPU: skipped")


@pytest.mark.slow                      # ~45 s on the shared 2-core machine
def test_gpu_bench_code_runs_on_cpu_at_tiny_size(tmp_path):
    """The script's own code (embed, trainer) as a lent GPU would run it, on the CPU with reco-tiny:
    figures written (not asserted: speed goes in benchmarks); faiss-cpu: the kNN part says skipped."""
    import faiss

    from reco.bench.gpu import bench_gpu

    out = bench_gpu(tmp_path, size="tiny", options={"clip.model": "reco-tiny", "clip.precision": "fp32"},
                    device="cpu")
    assert out["embed"]["encode_images_per_s"] > 0 and out["embed"]["raw_forward_images_per_s"] > 0
    assert out["train"]["steps_per_s"] > 0 and out["train"]["device"] == "cpu"
    if faiss.get_num_gpus() == 0:
        assert "faiss has no GPU" in out["knn"]["skipped"]
    assert (tmp_path / "gpu.json").exists()
