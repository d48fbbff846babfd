"""``reco serve-world``: serve the world folder on ``world.host:world.port`` until Ctrl-C."""
from __future__ import annotations

import argparse
import threading

from reco.errors import ConfigError
from reco.world.server import WorldServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="port (default: world.port of the config)")


def main(cfg, args) -> int:
    port = cfg.world.port if args.port is None else int(args.port)
    return serve(cfg.paths.world, cfg.world.host, port)


def serve(root, host: str, port: int, stop: threading.Event | None = None) -> int:
    """Serve ``root`` until Ctrl-C (or until ``stop`` is set)."""
    if not (root / "world.json").is_file():
        raise ConfigError(f"{root}: no world.json; run `reco world` first")
    stop = stop or threading.Event()
    with WorldServer(root, host=host, port=port) as server:
        print(f"serving {root} at {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0
