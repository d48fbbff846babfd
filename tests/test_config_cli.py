"""One config tree per run, and the command line's help and errors (issue 16 items 2, 3, 6;
issue 19 item 9). In-process through reco.cli.main; no stage does any work here."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from reco import cli, config_tree
from reco.config import preset
from reco.errors import ConfigError


def _cfg(argv: list[str]):
    args, extras = cli.build_parser().parse_known_args(argv)
    assert not extras
    return cli.config_from_args(args)


def _tiny_run(tmp_path, **train):
    """A run folder whose first stage recorded a tiny config (what `reco world --preset tiny`
    writes before its work)."""
    cfg = preset("tiny", workdir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    config_tree.record_new(cfg)
    return cfg


@pytest.mark.parametrize("suffix, text", [(".json", '{"train": {"steps": 50}}'),
                                          (".yaml", "train:\n  steps: 50\n")])
def test_config_file_with_one_key_keeps_every_other_preset_value(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    got = _cfg(["train", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--config", str(path)])
    want = preset("tiny", workdir=str(tmp_path / "w"))
    assert got == dataclasses.replace(want, train=dataclasses.replace(want.train, steps=50))


def test_later_stage_uses_the_recorded_config_without_preset(tmp_path, monkeypatch):
    monkeypatch.delenv("RECO_PRESET", raising=False)
    recorded = _tiny_run(tmp_path, steps=77)
    got = _cfg(["evaluate", "--workdir", recorded.workdir])
    assert got == recorded and got.preset == "tiny" and got.world.n_species == 80
    assert (tmp_path / "run" / "config.yaml").is_file()
    # --set merges onto the recorded config, not onto a preset
    got = _cfg(["evaluate", "--workdir", recorded.workdir, "--set", "eval.k=3"])
    assert got.train.steps == 77 and got.eval.k == 3 and got.preset == "tiny"


def test_preset_conflicting_with_the_run_is_refused(tmp_path, capsys):
    recorded = _tiny_run(tmp_path)
    rc = cli.main(["evaluate", "--preset", "demo", "--workdir", recorded.workdir])
    err = capsys.readouterr().err
    assert rc == 2 and "'tiny' run" in err and "--preset demo" in err and err.count("\n") == 1


def test_config_show_prints_the_recorded_tree(tmp_path, capsys):
    recorded = _tiny_run(tmp_path, steps=77)
    assert cli.main(["config", "show", "--workdir", recorded.workdir]) == 0
    out = capsys.readouterr().out
    assert "preset: tiny" in out and "steps: 77" in out and "recorded in" in out
    assert cli.main(["config", "keys"]) == 0
    keys = capsys.readouterr().out
    assert "train.steps = " in keys and "neighbours.k = 16" in keys and "in [1, 1024]" in keys


def test_recorded_config_round_trips_and_is_refused_when_corrupt(tmp_path):
    recorded = _tiny_run(tmp_path, steps=77)
    assert config_tree.load_recorded(recorded.workdir) == recorded
    assert config_tree.record(recorded) is False                    # unchanged: not rewritten
    (tmp_path / "run" / "config.yaml").write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"config.yaml: train.lr=nan"):
        config_tree.load_recorded(recorded.workdir)


def _error_of(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err          # one line
    return err


MISTAKES = [
    (["--set", "train.stpes=5"], ["train.stpes", "did you mean train.steps"]),
    (["--set", "train.lr=nan"], ["train.lr=nan", "finite"]),
    (["--set", "embed.threads=0"], ["embed.threads=0", "[1, 1024]"]),
    (["--set", "embed.timeout=0"], ["embed.timeout=0"]),
    (["--set", "embed.timeout=-1"], ["embed.timeout=-1"]),
    (["--set", "embed.encode_format=bmp"], ["embed.encode_format='bmp'", "png"]),
    (["--set", "embed.resize_mode=nonsense"], ["embed.resize_mode='nonsense'", "center_crop"]),
    (["--set", "neighbours.k=100000"], ["neighbours.k=100000", "[1, 1024]"]),
    (["--set", "train.steps=many"], ["train.steps", "integer"]),
    (["--set", "train=5"], ["train is a section"]),
    (["--model", "ViT-B-32", "--pretrained", "opnai"], ["clip.pretrained='opnai'", "did you mean openai"]),
]


@pytest.mark.parametrize("extra, words", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_each_mistake_is_one_line_naming_the_option(tmp_path, capsys, extra, words):
    work = tmp_path / "w"
    err = _error_of(["train", "--preset", "tiny", "--workdir", str(work), *extra], capsys)
    assert all(w in err for w in words), err
    assert not work.exists()                       # refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_clip_device(tmp_path, capsys):
    err = _error_of(["train", "--workdir", str(tmp_path / "w"), "--set", "clip.device=cuda"], capsys)
    assert "clip.device=cuda" in err and "--device" not in err.split(":")[1]


@pytest.mark.parametrize("text, words", [
    ('{"train": [1, 2]}', ["train is a section", "[1, 2]"]),
    ('{"train": {"stpes": 5}}', ["train.stpes", "did you mean train.steps"]),
    ("train:\n  lr: fast\n", ["train.lr='fast'", "number"]),
    ("eval:\n  modes: [off, both]\n", ["eval.modes", "bool"]),          # YAML's unquoted off
    ("{not json", ["not valid JSON or YAML"]),
    ("- 1\n- 2\n", ["expected a mapping"]),
])
def test_bad_config_files_name_the_file_and_option(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = _error_of(["train", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--config", str(path)],
                    capsys)
    assert str(path) in err and all(w in err for w in words), err
    missing = _error_of(["train", "--config", str(tmp_path / "nope.json")], capsys)
    assert "nope.json: config file not found" in missing


def test_unknown_flag_prints_the_subcommands_usage_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--stpes", "5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: reco train" in err
    assert "did you mean --set train.steps" in err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--workdri", "x"])
    assert "did you mean --workdir" in capsys.readouterr().err


def test_help_shows_defaults_and_an_example_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["query", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "example:\n  reco query" in out and "(default: 10)" in out
    assert "reco config keys" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.steps = 200" in out and "train.lr = 0.001" in out      # the --set keys, listed
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("reco ")
    assert all(c.example.startswith(f"reco {name} ") for name, c in cli.COMMANDS.items())


def test_a_successful_stage_records_its_options(tmp_path, monkeypatch):
    """The first stage writes config.yaml before its work; a success with changed options
    updates it; a failure leaves it as it was."""
    from reco.index import cli as index_cli

    calls = []
    monkeypatch.setattr(index_cli, "main", lambda cfg, args: calls.append(cfg) or (2 if cfg.index.seed == 9 else 0))
    work = str(tmp_path / "w")
    assert cli.main(["build-index", "--preset", "tiny", "--workdir", work]) == 0
    assert config_tree.load_recorded(work) == calls[-1]
    assert cli.main(["build-index", "--workdir", work, "--set", "index.recall_k=5"]) == 0
    assert config_tree.load_recorded(work).index.recall_k == 5
    assert cli.main(["build-index", "--workdir", work, "--set", "index.seed=9"]) == 2
    assert config_tree.load_recorded(work).index.seed == 0


def test_neighbours_k_is_capped_by_the_machine_before_any_work():
    from reco.pipelines.neighbours.config import NeighboursConfig
    from reco.pipelines.neighbours.job import check_k_fits

    check_k_fits(NeighboursConfig(k=16, shard_size=1000), memory_n=10, dim=64)       # padded, fine
    with pytest.raises(ConfigError, match=r"neighbours.k=1024: .* use neighbours.k <= \d+"):
        check_k_fits(NeighboursConfig(k=1024, shard_size=10000), memory_n=5403, dim=512, budget=4 << 30)


def test_uint64_label_is_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reco.errors import FormatError
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.urls import inspect_url_files

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.png"], "caption": ["x"],
                             "label": pa.array([2 ** 63 + 5], pa.uint64())}), path)
    with pytest.raises(FormatError, match=r"urls.parquet: row 0: label 9223372036854775813"):
        inspect_url_files([str(path)], EmbedConfig())


def test_library_configs_are_validated_too():
    from reco.pipelines.config import EmbedConfig

    with pytest.raises(ConfigError, match=r"embed.threads=0: must be in \[1, 1024\]"):
        EmbedConfig(threads=0)
    with pytest.raises(ConfigError, match="train.lr=nan"):
        dataclasses.replace(preset("tiny").train, lr=float("nan"))
    assert json.loads(json.dumps(preset("demo").to_dict()))["train"]["steps"] == 200
