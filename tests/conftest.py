"""Shared test set-up. Every test runs with HOME/TMPDIR inside pytest's temporary folder so that
nothing (Beam's runner downloads, caches) lands outside the test's folders."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("HOME", "TMPDIR")}
    os.environ["HOME"] = str(home)
    os.environ["TMPDIR"] = str(home)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _console_reset():
    """Each test starts with the terminal's defaults: a test that ran ``reco ... --json`` or
    ``-q`` (reco.console's process-wide state) must not change what the next one prints."""
    from reco import console

    saved = dict(console._state)
    yield
    console._state.clear()
    console._state.update(saved)


# Session fixtures, one module per stage, each building on the previous one:
#   tiny_world (world + base CLIP + loopback server) -> tiny_embedded -> tiny_indexed
#   -> tiny_neighbours -> tiny_trained
pytest_plugins = [
    "tests.fixtures.world",
    "tests.fixtures.embed",
    "tests.fixtures.index",
    "tests.fixtures.trainer",
]
