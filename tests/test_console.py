"""reco.console: levels per verbosity, per-thread capture of library prints, bars advanced by
key, one summary format (the terminal as a whole: tests/test_terminal.py)."""
from __future__ import annotations

import io
import json
import logging
import sys
import threading

import pytest

from reco import console


@pytest.fixture
def restore_logging():
    root, own = logging.getLogger(), logging.getLogger("reco")
    saved = (root.level, list(root.handlers), own.level, dict(console._state))
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    own.setLevel(saved[2])
    console._state.update(saved[3])


@pytest.mark.parametrize("verbosity,shown,hidden", [
    (console.NORMAL, ["reco.x INFO", "lib WARNING"], ["lib INFO", "reco.x DEBUG"]),
    (console.QUIET, ["reco.x WARNING", "lib ERROR"], ["reco.x INFO", "lib WARNING"]),
    (console.VERBOSE, ["reco.x DEBUG", "lib INFO"], ["lib DEBUG"]),
])
def test_levels_per_verbosity(restore_logging, verbosity, shown, hidden):
    stream = io.StringIO()
    console.setup_logging(verbosity, stream=stream)
    for name, level in [("reco.x", "DEBUG"), ("reco.x", "INFO"), ("reco.x", "WARNING"), ("lib", "DEBUG"),
                        ("lib", "INFO"), ("lib", "WARNING"), ("lib", "ERROR")]:
        logging.getLogger(name).log(getattr(logging, level), "%s %s", name, level)
    logging.getLogger().info("INFO root: what open_clip logs")
    out = stream.getvalue()
    assert all(s in out for s in shown) and not any(h in out for h in hidden), out
    assert ("what open_clip logs" in out) == (verbosity >= console.VERBOSE)


def test_captured_output_is_per_thread_and_goes_to_the_log(caplog):
    log = logging.getLogger("reco.test")
    other_thread = []
    caplog.set_level(logging.DEBUG, logger="reco.test")
    real = io.StringIO()
    old, sys.stdout = sys.stdout, real
    try:
        with console.captured_output(log):
            print("Downloading starting now, check your bandwidth")
            t = threading.Thread(target=lambda: print("a line of another thread"))
            t.start()
            t.join()
            sys.stderr.write("  0%|   | 0/1\r100%|###| 1/1\n")
            other_thread.append(sys.stdout)
        print("after")
    finally:
        sys.stdout = old
    assert "another thread" in real.getvalue() and "after" in real.getvalue()
    assert "bandwidth" not in real.getvalue()
    records = [r.getMessage() for r in caplog.records if r.name == "reco.test"]
    assert records == ["Downloading starting now, check your bandwidth", "100%|###| 1/1"]


def test_advance_moves_the_tracked_bar_only(monkeypatch):
    monkeypatch.setenv("RECO_PROGRESS", "1")
    assert not console.advance("/nowhere", 5)
    with console.tracked("/out", total=10, desc="embed", unit="row") as bar:
        assert console.advance("/out", 4) and bar.n == 4
    assert not console.advance("/out", 1)


def test_one_summary_format(restore_logging, capsys):
    console.print_summary("stage", {"rows": 10, "skip": None, "counts": {"success": 9, "failed": 1},
                                    "a long key": 0.25})
    assert capsys.readouterr().out.splitlines() == [
        "stage", "  rows        10", "  counts      success 9, failed 1", "  a long key  0.25"]
    console.setup_logging(console.NORMAL, json_summaries=True)
    console.print_summary("stage", {"rows": 10}, data={"rows": 10, "path": "x"})
    assert json.loads(capsys.readouterr().out) == {"stage": "stage", "rows": 10, "path": "x"}


def test_quiet_has_no_bars(restore_logging, monkeypatch):
    monkeypatch.setenv("RECO_PROGRESS", "1")
    assert console.bars_enabled()
    console.setup_logging(console.QUIET)
    assert not console.bars_enabled() and console.progress(total=3).disable
