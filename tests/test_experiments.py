"""experiments/ (outside the library): the long-tail report's statistics and figure on
synthetic ablation results, and the package boundary (reco never imports experiments;
experiments use only reco's public names)."""
import ast
import math
from pathlib import Path

import pytest

from experiments import stats
from experiments.longtail import report

REPO = Path(__file__).resolve().parents[1]


def _evals(mode, top1):
    return {mode: {"zeroshot": {f"{g}_among_{g}": {"top1": top1[g]} for g in stats.GROUPS}
                   | {g: {"top1": top1[g] / 2} for g in stats.GROUPS}}}


def _result(seed, shift):
    base = {"head": 50.0, "tail": 40.0, "unseen": 30.0}
    up = lambda d: {g: base[g] + d + shift for g in base}   # noqa: E731
    variants = {}
    for name, d in (("mean", 10), ("reco", 5), ("weighted", 12), ("mlp", 0)):
        ev = _evals("both", up(d))
        ev.update(_evals("off", up(0)))
        variants[name] = {"eval": ev, "fusion": "transformer" if name == "reco" else name, "k": 10,
                          "train_info": {"selection": {"step": 100, "warning": None}}}
    variants["reco"]["k_sweep"] = {str(k): _evals("both", up(k)) for k in (1, 5, 10)}
    variants["mean"]["k_sweep"] = {str(k): _evals("both", up(10 - k)) for k in (1, 5, 10)}
    variants["train_k1"] = {"eval": _evals("both", up(1)), "fusion": "transformer", "k": 1,
                            "k_sweep": {str(k): _evals("both", up(k / 2)) for k in (1, 5, 10)},
                            "train_info": {"selection": {"step": 50, "warning": "cannot discriminate: x"}}}
    return {"seed": seed, "steps": 200, "memory_sizes": {"full": 16000}, "variants": variants,
            "validation": {"species": [1, 2], "images": 40}}


def test_mean_and_standard_error_over_seeds():
    assert stats.mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)))
    assert math.isnan(stats.mean_se([4.0])[1]) and stats.mean_se([]) is None
    per_seed = [_result(0, 0.0), _result(1, 2.0), _result(2, 4.0)]
    assert stats.mean_se(per_seed, "clip", "head") == (52.0, pytest.approx(2 / math.sqrt(3)))
    assert stats.delta(per_seed, "weighted", "tail") == (pytest.approx(2.0), pytest.approx(0.0))
    assert stats.delta(per_seed, "reco", "unseen")[0] == pytest.approx(-5.0)


def test_report_and_k_saturation_figure(tmp_path):
    per_seed = [_result(0, 0.0), _result(1, 2.0), _result(2, 4.0)]
    text = report(per_seed)
    assert "| frozen CLIP | 52.0 ± 1.2 | 42.0 ± 1.2 | 32.0 ± 1.2 |" in text
    assert "| learned per-item weighting − mean | +2.0 ± 0.0 |" in text
    assert "| k=1 |" in text and "| k=10 |" in text and "k'=5" in text
    assert "| mean fusion (no training) | 41.0 ± 1.2 | 37.0 ± 1.2 | 32.0 ± 1.2 |" in text
    assert "seed 0, train_k1: cannot discriminate" in text
    curves = stats.k_curves(per_seed, "head")
    assert list(curves) == ["k=1", "k=10", "mean fusion"]
    assert curves["k=10"][5][0] == pytest.approx(50 + 5 + 2)
    assert curves["mean fusion"][1][0] == pytest.approx(50 + 9 + 2)
    png = stats.figure(per_seed, tmp_path / "k.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_library_never_imports_experiments_and_experiments_use_public_names():
    for folder in ("reco", "trainer", "pipelines", "index"):
        for path in (REPO / folder).rglob("*.py"):
            assert not any(m.split(".")[0] == "experiments" for m, _ in _imports(path)), path
    for path in (REPO / "experiments").glob("*.py"):
        for module, names in _imports(path):
            if module.startswith("reco"):
                assert not any(part.startswith("_") for part in module.split(".")), (path, module)
                assert not any(n.startswith("_") for n in names), (path, module, names)


def test_ablation_options_come_from_the_preset_and_the_command_flags(tmp_path, capsys):
    """The ablations' options are the experiment's (not EvalConfig's): the preset's values, changed
    by `reco ablations` flags, each checked like a run option."""
    import argparse
    import dataclasses

    from experiments import config as ablation_config
    from experiments.ablations import add_arguments
    from reco import config as config_lib
    from reco.cli import main
    from reco.errors import ConfigError
    from reco.evaluation.config import EvalConfig

    assert not {f.name for f in dataclasses.fields(EvalConfig)} & {
        f.name for f in dataclasses.fields(ablation_config.AblationConfig)}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_lib.preset("longtail_small")
    got = ablation_config.from_args(cfg, parser.parse_args(
        ["--steps", "7", "--ablation-eval-k", "1,4", "--variants", "reco,mlp"]))
    assert (got.ablation_steps, got.ablation_eval_k, got.ablations) == (7, (1, 4), ("reco", "mlp"))
    assert got.ablation_val_checkpoints == 5                    # the longtail preset's
    assert ablation_config.for_run(config_lib.preset("demo")) == ablation_config.AblationConfig()
    with pytest.raises(ConfigError, match="ablation_val_fraction"):
        ablation_config.from_args(cfg, parser.parse_args(["--ablation-val-fraction", "0.95"]))
    with pytest.raises(ConfigError, match="--steps x: not a valid int"):
        ablation_config.from_args(cfg, parser.parse_args(["--steps", "x"]))
    assert main(["ablations", "--workdir", str(tmp_path / "run"), "--preset", "tiny", "--steps", "0"]) == 2
    assert "ablation.ablation_steps" in capsys.readouterr().err


def test_a_run_recorded_with_the_retired_ablation_options_still_loads(tmp_path):
    """Before issue 18 the ablation options were eval.*: a config.yaml or an evaluation record
    that holds them still loads and matches (the options are ignored)."""
    from reco import config as config_lib
    from reco.config_tree import config_path, load_recorded, save_recorded
    from reco.record import Record

    cfg = config_lib.preset("tiny", workdir=str(tmp_path))
    save_recorded(cfg)
    text = config_path(tmp_path).read_text().replace("eval:\n", "eval:\n  ablation_steps: 100\n  ablations: []\n")
    assert "ablation_steps" in text
    config_path(tmp_path).write_text(text)
    assert load_recorded(tmp_path) == cfg
    old = Record(stage="evaluate", options={"eval.k": None, "eval.ablation_steps": 100})
    old.check_same(tmp_path, options={"eval.k": None}, inputs={}, model_id=None, command="evaluate")


def test_experiments_run_the_stages_of_the_demo_and_the_cli():
    from experiments.chain import CHAIN
    from reco.cli import COMMANDS, RECORDS_CONFIG
    from reco.demo import STAGES

    names = [s.name for s in STAGES]
    assert list(CHAIN) == names[:len(CHAIN)]
    assert set(names) <= set(COMMANDS) and set(names) <= RECORDS_CONFIG
