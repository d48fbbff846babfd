"""``reco serve-world``: serve the world folder on its recorded address until Ctrl-C.

The address is the world's (world.json, see :mod:`reco.world.serving`); the server's token is
left in ``<world>/.server.json`` while it runs, so ``reco embed-memory`` can tell it apart from
any other program on that port."""
from __future__ import annotations

import argparse
import threading

from reco.errors import ConfigError
from reco.world.server import WorldServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: the world's own, recorded in world.json)")


def main(cfg, args) -> int:
    from reco.world.serving import world_address

    host, port = world_address(cfg.paths.world)
    return serve(cfg.paths.world, host, port if args.port is None else int(args.port))


def serve(root, host: str, port: int, stop: threading.Event | None = None) -> int:
    """Serve ``root`` until Ctrl-C (or until ``stop`` is set)."""
    if not (root / "world.json").is_file():
        raise ConfigError(f"{root}: no world.json; run `reco world` first")
    stop = stop or threading.Event()
    from reco.world.serving import SERVER_FILE, write_server_file

    with WorldServer(root, host=host, port=port) as server:
        record = write_server_file(root, server)
        print(f"serving {root} at {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if (root / SERVER_FILE) == record:
                record.unlink(missing_ok=True)
    return 0
