"""The paired benchmark runner and ``summary.md`` (issue 21): interleaving, statistics, the table.
Nothing here is timed; the children are trivial commands."""
from __future__ import annotations

import json
import sys

import pytest

from reco.bench import paired as pb
from reco.bench.cli import run_benches


def test_quantiles_median_iqr_min_max():
    q = pb.quantiles([4.0, 1.0, 3.0, 2.0])
    assert q == {"median": 2.5, "q25": 1.75, "q75": 3.25, "min": 1.0, "max": 4.0}
    assert pb.quantiles([0.7]) == {"median": 0.7, "q25": 0.7, "q75": 0.7, "min": 0.7, "max": 0.7}
    with pytest.raises(ValueError):
        pb.quantiles([])


def test_rounds_interleave_abba_and_ratios_are_per_round():
    calls, rates = [], {"A": iter([8.0, 6.0, 9.0, 5.0]), "B": iter([10.0, 10.0, 10.0, 10.0])}

    def runner(argv, timeout):
        which = argv[-1]
        calls.append(which)
        return {"rate": next(rates[which]), "who": which}

    stats = pb.paired(["-c", "A"], ["-c", "B"], 4, runner=runner)
    assert calls == list("ABBAABBA")
    assert [p["order"] for p in stats["pairs"]] == ["AB", "BA", "AB", "BA"]
    assert [round(p["ratio"], 3) for p in stats["pairs"]] == [0.8, 0.6, 0.9, 0.5]
    assert stats["ratio"] == {"median": 0.7, "q25": 0.575, "q75": 0.825, "min": 0.5, "max": 0.9}
    assert stats["a_rate"] == 7.0 and stats["b_rate"] == 10.0 and stats["rounds"] == 4
    assert len(stats["load_before"]) == len(stats["load_after"]) == 4
    assert all(isinstance(x, float) for x in stats["load_before"] + stats["load_after"])
    with pytest.raises(ValueError):
        pb.paired(["-c", "A"], ["-c", "B"], 0, runner=runner)


def test_fresh_child_processes_and_their_failures(tmp_path):
    script = "import json, os; print('noise'); print(json.dumps({'rate': 2.0, 'pid': os.getpid()}))"
    stats = pb.paired(["-c", script], ["-c", script.replace("2.0", "4.0")], 2)
    pids = [p[w]["pid"] for p in stats["pairs"] for w in ("a", "b")]
    assert len(set(pids)) == 4 and stats["ratio"]["median"] == 0.5           # a new process each time
    with pytest.raises(pb.BenchChildError, match="exit 3"):
        pb.run_child(["-c", "import sys; sys.exit(3)"])
    with pytest.raises(pb.BenchChildError, match="no result with a rate"):
        pb.run_child(["-c", "print('{\"seconds\": 1}')"])


def _claims() -> list[dict]:
    def run(rate, cpu):                  # 10 items in 10/rate s, with cpu CPU seconds
        return {"rate": rate, "seconds": 10 / rate, "cpu_seconds": cpu}

    stats = pb.summarise([{"a": run(9.0, 2.0), "b": run(10.0, 1.8), "ratio": 0.9, "load_before": 0.5,
                           "load_after": 0.7},
                          {"a": run(7.0, 1.0), "b": run(10.0, 0.9), "ratio": 0.7, "load_before": 0.4,
                           "load_after": 0.4}])
    assert stats["cpu_ratio"] == 0.9 and pb.cpu_ratio({"a": {"rate": 1.0}, "b": run(1.0, 1.0)}) is None
    return [pb.Claim.from_paired("stage / raw", stats, 0.8, "img/s", "stage", "raw", "reco bench --only x").as_dict(),
            pb.Claim("recall@10", 0.984, 0.95).as_dict(),
            pb.Claim("RSS n / n|10", 1.3, 1.2, at_most=True).as_dict(),
            pb.Claim("reported only", 2.0).as_dict()]


def test_claims_and_the_summary_table():
    claims = _claims()
    assert [c["met"] for c in claims] == [True, True, False, None]    # 0.8 median of 0.9, 0.7
    table = pb.summary_markdown({"machine": {"cpus": 2}, "quick": True, "x": {"claims": claims},
                                 "y": {"no": "claims"}})
    lines = table.strip().splitlines()
    header = [line for line in lines if line.startswith("| claim")]
    assert len(header) == 1 and header[0].count("|") == len(pb.COLUMNS) + 1
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| claim")]
    assert len(rows) == 4 and all(r.count("|") - r.count("\\|") == len(pb.COLUMNS) + 1 for r in rows)
    first = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
    assert first[:10] == ["stage / raw", ">= 0.8", "0.800", "0.750-0.850", "stage 8.0 vs raw 10.0 img/s",
                          "2", "0.900", "0.40-0.50", "0.40-0.70", "yes"]
    assert "<= 1.2" in rows[2] and "**no**" in rows[2] and "RSS n / n\\|10" in rows[2]
    assert rows[3].split(" | ")[9] == "n/a"


def test_reco_bench_writes_summary_md_from_every_bench(tmp_path, monkeypatch):
    """`reco bench` gathers the benches' claims into summary.md beside results.json; --rounds
    reaches the benches that take it."""
    from reco import cli
    from reco.bench import cli as bench_cli

    seen = {}

    def fake(name):
        def bench(out_dir, quick=True, options=None, rounds=None):
            seen[name] = rounds
            return {"claims": [pb.Claim(f"{name} claim", 1.0, 0.8).as_dict()]}
        return bench

    import types
    module = types.ModuleType("fake_benches")
    module.one, module.two = fake("one"), fake("two")
    module.three = lambda out_dir, quick=True: {"figure": 1}             # no claims, no rounds
    monkeypatch.setitem(sys.modules, "fake_benches", module)
    monkeypatch.setattr(bench_cli, "BENCHES", {n: f"fake_benches:{n}" for n in ("one", "two", "three")})
    monkeypatch.setattr("reco.bench.options.HONOURS", {"one": (), "two": (), "three": ()})
    rc = cli.main(["bench", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--rounds", "2"])
    assert rc == 0 and seen == {"one": 2, "two": 2}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| one claim | >= 0.8 | 1.000 |" in summary and "| two claim |" in summary
    assert json.loads((tmp_path / "out" / "results.json").read_text())["three"]["figure"] == 1
    assert run_benches(["three"], tmp_path / "o2", True, rounds=5)["three"]["figure"] == 1
