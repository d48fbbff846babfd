"""What a user sees on a terminal (issue 16.5): reco's own lines, a bar with ETA per long step,
one summary per stage, nothing of the libraries' (open_clip's INFO lines, autofaiss's log and
bars, img2dataset's banners, Beam's type-hint notices), and ``-q`` for scripts.

Commands run on a pseudo-terminal (tests/terminal_tools.py), so bars draw as for a user; the
screen is replayed and its lines counted. The whole tiny demo is in the slow set (minutes); the
default suite counts the lines of one real stage.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terminal_tools import run_on_terminal, screen_lines

RECO = [sys.executable, "-m", "reco.cli"]
FOREIGN = ("INFO root", "INFO autofaiss", "autofaiss", "nb_cores", "Sharding file", "bwm-ng",
           "apache_beam", "Traceback", "it/s]")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _assert_only_reco(screen: list[str]) -> None:
    text = "\n".join(screen)
    for word in FOREIGN:
        assert word not in text, f"{word!r} on the terminal:\n{text}"


def test_build_index_on_a_terminal_is_one_summary(tmp_path):
    """autofaiss alone printed 37 log lines and 3 bars per index here: now one summary."""
    from tests.fixtures.index import make_synthetic

    make_synthetic(tmp_path, n_memory=400, n_train=20, n_test=20, dim=16, n_clusters=8)
    rc, raw = run_on_terminal([*RECO, "build-index", "--preset", "tiny", "--workdir", str(tmp_path)],
                              env=_env(), timeout=300)
    screen = screen_lines(raw)
    assert rc == 0, raw[-3000:]
    _assert_only_reco(screen)
    assert screen[0] == "build-index" and screen[1].split()[:3] == ["status", "built", "in"]
    assert len(screen) <= 6, "\n".join(screen)
    rc, raw = run_on_terminal([*RECO, "build-index", "--preset", "tiny", "--workdir", str(tmp_path)],
                              env=_env(), timeout=300)
    assert rc == 0 and "up to date, skipped" in raw and "written" not in raw


def test_quiet_prints_only_the_summary_and_no_bar(tmp_path):
    """``-q`` for scripts: stdout holds the summary, stderr nothing (no bar, no log line)."""
    from tests.fixtures.trainer import write_synthetic_workdir

    write_synthetic_workdir(tmp_path, n=256, dim=16, k=4, rows_per_shard=128)
    sets = ["train.batch_size=32", "train.k=4", "train.head.heads=2", "train.steps=8",
            "train.checkpoint_every=4", "train.shuffle_buffer=64"]
    proc = subprocess.run([*RECO, "train", "--preset", "tiny", "--workdir", str(tmp_path), "-q",
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, env={**_env(), "RECO_PROGRESS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "train" and [line.split()[0] for line in lines[1:]] == ["steps", "loss", "heads", "output"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiny_demo_fits_one_screen_and_ends_with_the_table(tiny_trained, tmp_path):
    """``reco demo --preset tiny`` on a copy of the fixture run (world, base CLIP and embeddings
    done; the rest redone): fewer than 60 lines, the results table last; a rerun prints the
    table again."""
    work = Path(shutil.copytree(tiny_trained.paths.root, tmp_path / "run", symlinks=True))
    for name in ("index", "neighbours", "heads", "eval"):       # made with the fixture's options
        shutil.rmtree(work / name, ignore_errors=True)
    # the embeddings name the CLIP by the path that reached it (issue 16.1): the fixture's
    model = f"local-dir:{tiny_trained.paths.base_clip}"
    cmd = [*RECO, "demo", "--preset", "tiny", "--workdir", str(work), "--model", model,
           "--set", f"world.port={_free_port()}"]
    for attempt in ("first", "rerun"):
        rc, raw = run_on_terminal(cmd, env=_env(), timeout=1200)
        screen = screen_lines(raw)
        assert rc == 0, raw[-5000:]
        _assert_only_reco(screen)
        print(f"\n{attempt} run of reco demo --preset tiny: {len(screen)} lines on the terminal")
        assert len(screen) < 60, f"{attempt}: {len(screen)} lines\n" + "\n".join(screen)
        head = max(i for i, line in enumerate(screen) if line.startswith("| mode |"))
        table = screen[head:]                             # the results table ends the output
        assert all(line.startswith("|") for line in table) and table[-1].startswith("| reco both"), \
            "\n".join(screen)
        assert any(line.startswith("[6/6] evaluate") for line in screen)
