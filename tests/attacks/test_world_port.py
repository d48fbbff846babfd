"""Whatever listens on the world's port is not trusted: each world gets a free port of its own
(recorded in world.json), and the server answering there must show this run's token."""
from __future__ import annotations

import dataclasses
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reco import config as config_lib
from reco.errors import ConfigError
from reco.world.build import ensure_world
from reco.world.config import WorldConfig
from reco.world.server import WorldServer
from reco.world.serving import serve_world, world_address, write_server_file

MINI = WorldConfig(n_species=3, n_pretrain=3, n_memory=6, n_train=3, n_test_per_species=1,
                   image_size=16)


@pytest.fixture
def run(tmp_path):
    """A RecoConfig whose (mini) world exists, built with the default world.port=0."""
    cfg = config_lib.preset("tiny", workdir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, world=dataclasses.replace(MINI))
    ensure_world(cfg.world, cfg.paths.world)
    return cfg


class _Stranger:
    """Another program's HTTP server on a port: it serves the same files (so every download
    would succeed) but is not the world's server."""

    def __init__(self, root, port):
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a, **k: None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_each_world_gets_a_free_port_recorded_in_world_json(run):
    host, port = world_address(run.paths.world)
    assert host == "127.0.0.1" and port not in (0, 18734)            # not a fixed, shared port
    assert json.loads((run.paths.world / "world.json").read_text())["base_url"] == f"http://{host}:{port}/"
    urls = (run.paths.world / "urls" / "test.parquet")
    import pyarrow.parquet as pq
    assert all(u.startswith(f"http://{host}:{port}/") for u in pq.read_table(urls)["url"].to_pylist())
    assert ensure_world(MINI, run.paths.world)["action"] == "kept"   # a free recorded port is kept


def test_a_stranger_on_the_worlds_port_is_refused_before_any_download(run):
    host, port = world_address(run.paths.world)
    stranger = _Stranger(run.paths.world, port)
    try:
        with pytest.raises(ConfigError, match="taken by a program that is not this world's server"):
            with serve_world(run):
                pytest.fail("embedding would have started")
        from reco.cli import main

        rc = main(["embed-memory", "--preset", "tiny", "--workdir", run.workdir, "--split", "test"])
        assert rc == 2
        assert not run.paths.embedded("test").exists()
        moved = ensure_world(MINI, run.paths.world)                  # `reco world` moves it
        assert moved["action"] == "readdressed" and world_address(run.paths.world)[1] != port
    finally:
        stranger.close()


def test_the_worlds_own_server_is_checked_and_used(run):
    with serve_world(run) as server:
        assert server is not None and server.port == world_address(run.paths.world)[1]
    host, port = world_address(run.paths.world)
    with WorldServer(run.paths.world, host, port) as own:                # `reco serve-world`
        write_server_file(run.paths.world, own)
        with serve_world(run) as server:
            assert server is None                                       # recognised by its token
        (run.paths.world / ".server.json").write_text(json.dumps(
            {"host": host, "port": port, "token": "forged", "pid": 1}))
        with pytest.raises(ConfigError, match="not this world's server"):
            with serve_world(run):
                pass


def test_a_world_port_other_than_the_recorded_one_is_refused(run):
    _, port = world_address(run.paths.world)
    cfg = dataclasses.replace(run, world=dataclasses.replace(run.world, port=port + 1))
    with pytest.raises(ConfigError, match="re-address"):
        with serve_world(cfg):
            pass
