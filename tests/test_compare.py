"""`reco compare`: the REACT vs RECO table reads both systems' own result files."""
from __future__ import annotations

import json

import pytest

from reco.config import preset
from reco.errors import FormatError
from reco.evaluation.compare import compare


def _zs(top1_all, top1_unseen):
    m = lambda v: {"top1": v, "top5": 100.0, "mean_per_class_recall": v, "n": 10}  # noqa: E731
    return {"all": m(top1_all), "seen": m(50.0), "unseen": m(top1_unseen),
            "unseen_among_unseen": m(top1_unseen + 10)}


def test_compare_table_has_every_system_and_column(tmp_path):
    cfg = preset("tiny", workdir=str(tmp_path))
    cfg.paths.eval.mkdir(parents=True)
    (cfg.paths.react / "model").mkdir(parents=True)
    reco = {"modes": {"off": {"zeroshot": _zs(27.5, 20.0)}, "both": {"zeroshot": _zs(40.0, 55.0)}}}
    react = {"frozen": _zs(27.5, 20.0), "react": _zs(61.3, 64.2)}
    (cfg.paths.eval / "results.json").write_text(json.dumps(reco))
    (cfg.paths.react / "model" / "eval.json").write_text(json.dumps(react))

    table, info = compare(cfg)

    assert info["rows"]["RECO v̄&t̄"]["unseen_among_unseen"] == 65.0
    assert info["rows"]["REACT (customised for the test species)"]["all"] == 61.3
    assert "RECO v̄ (image side)" not in info["rows"]          # mode not evaluated: no row
    assert "| REACT (customised for the test species) | 61.3 | 50.0 | 64.2 | 74.2 |" in table
    assert (cfg.paths.eval / "compare.md").read_text().endswith(table)


def test_compare_names_the_missing_file(tmp_path):
    cfg = preset("tiny", workdir=str(tmp_path))
    with pytest.raises(FormatError, match="results.json: missing; run `reco evaluate`"):
        compare(cfg)
