"""Serving a run's world for the stages that download it, with the server's identity checked.

Each world has its own port, picked free when the world is built (``world.port=0``, the
default) and recorded in ``world.json`` (its ``base_url``; the URL lists point there). Whoever
serves it runs a :class:`~reco.world.server.WorldServer`, which answers a random per-run token
at ``/_reco/identity``. :func:`serve_world` binds the world's port and checks, before anything is
downloaded, that the token coming back from that address is its own; when the port is taken, it
accepts only a server whose token is the one ``reco serve-world`` left in ``<world>/.server.json``
(mode 0600), and refuses anything else with a clear error. Whatever else listens on a port is
never trusted.

The CLI and demo layers use it (``reco embed-memory`` on the world's splits, ``reco demo``);
the pipelines never import the world package.
"""
from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from reco.errors import ConfigError
from reco.world.server import IDENTITY_PATH, WorldServer

log = logging.getLogger(__name__)
SERVER_FILE = ".server.json"


def world_address(world_dir: str | Path) -> tuple[str, int]:
    """(host, port) the world's URL lists point at, from its world.json."""
    path = Path(world_dir) / "world.json"
    try:
        parts = urlsplit(json.loads(path.read_text())["base_url"])
        return parts.hostname, int(parts.port)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: no world here (or no base_url in it); run `reco world` first "
                          f"({exc})") from exc


def identity(host: str, port: int, timeout: float = 3.0) -> str | None:
    """The token answered at ``host:port`` IDENTITY_PATH, or None (nothing, or not a world server)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", IDENTITY_PATH)
        response = conn.getresponse()
        body = response.read(256)
        return body.decode("ascii", "replace") if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def same_token(got: str | None, want: str) -> bool:
    return got is not None and hmac.compare_digest(got.encode(), want.encode())


def write_server_file(world_dir: str | Path, server: WorldServer) -> Path:
    """Record ``server``'s address and token in ``<world>/.server.json`` (readable by its owner)."""
    path = Path(world_dir) / SERVER_FILE
    tmp = path.with_name(f".{SERVER_FILE}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": server.host, "port": server.port, "token": server.token,
                   "pid": os.getpid()}, f)
    os.replace(tmp, path)
    return path


def _recorded_token(world_dir: Path, host: str, port: int) -> str | None:
    try:
        info = json.loads((world_dir / SERVER_FILE).read_text())
        if info["host"] == host and int(info["port"]) == port:
            return str(info["token"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def served_by_own_server(world_dir: str | Path, host: str, port: int) -> bool:
    """True when ``host:port`` answers the token ``reco serve-world`` recorded for this world."""
    token = _recorded_token(Path(world_dir), host, port)
    return token is not None and same_token(identity(host, port), token)


def _check_port(cfg, port: int) -> None:
    wanted = int(getattr(cfg.world, "port", 0) or 0)
    if wanted and wanted != port:
        raise ConfigError(f"world.port={wanted}, but the world in {cfg.paths.world} is addressed at "
                          f"port {port} (world.json); run `reco world --set world.port={wanted}` to "
                          f"re-address it, or leave world.port unset")


@contextlib.contextmanager
def serve_world(cfg) -> Iterator[WorldServer | None]:
    """Serve ``cfg.paths.world`` on its recorded address for the duration, after checking that
    the server answering there is this one (or the ``reco serve-world`` that recorded its token).
    Yields the server (None when a recorded ``reco serve-world`` already serves it)."""
    world = Path(cfg.paths.world)
    host, port = world_address(world)
    _check_port(cfg, port)
    try:
        server = WorldServer(world, host, port).start()
    except ConfigError as exc:                       # the port is taken: by whom?
        if served_by_own_server(world, host, port):
            log.info("the world is already served on %s:%d by reco serve-world", host, port)
            yield None
            return
        raise ConfigError(
            f"world server: {host}:{port}, the port of the world in {world} (world.json), is taken "
            f"by a program that is not this world's server; stop it, or run `reco world` to move "
            f"the world to a free port ({exc})") from exc
    with server:
        got = identity(host, port)
        if not same_token(got, server.token):
            raise ConfigError(f"world server: {host}:{port} answers with another identity than the "
                              f"server this run started ({got!r}); refusing to embed from it")
        yield server
