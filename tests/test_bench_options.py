"""`reco bench --set/--model/--device` reach the benches that use them, others are refused
(issue 21). Unit level: the benches' measuring functions are replaced, nothing is timed."""
from __future__ import annotations

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
    calls = []
    monkeypatch.setattr(bench_embed_mod, "bench_model",
                        lambda *args, **kw: calls.append((args, kw)) or {"model": args[0]})
    bench_embed_mod.bench_embed(tmp_path, options={"clip.model": "ViT-B-32", "clip.device": "cpu",
                                                   "clip.precision": "bf16", "embed.batch_size": 32})
    (model, pretrained, _, batch, *_), kw = calls[0]
    assert (model, pretrained, batch) == ("ViT-B-32", None, 32)
    assert kw == {"device": "cpu", "precision": "bf16"}


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
