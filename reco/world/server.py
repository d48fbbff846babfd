"""Loopback HTTP server for the world's images, with hostile endpoints for reliability tests.

``WorldServer(root)`` serves the files under ``root`` (``/images/<split>/<file>.png``) from a
``ThreadingHTTPServer`` in a daemon thread; it binds loopback addresses only. Under
``/_hostile/`` it misbehaves on purpose:

==================================  ============================================================
``/_hostile/404/x``                 404 Not Found
``/_hostile/500/x``                 500 Internal Server Error
``/_hostile/garbage/x.png``         200, ``image/png``, bytes that are not an image
``/_hostile/truncated/x.png``       200, the first half of a valid PNG
``/_hostile/slow/x.png?s=SECONDS``  sleeps SECONDS (default 5, at most 60) then a valid PNG
``/_hostile/redirect-loop/x``       302 to itself (with a counter), forever
``/_hostile/redirect/x?to=URL``     302 to URL (e.g. a private address: the SSRF guard's test)
``/_hostile/bomb/x.png``            a ~100 kB PNG declaring 30000 x 30000 pixels
``/_hostile/bpp-bomb/x.png``        a 498 kB PNG of 7999 x 7999 16-bit RGBA pixels (512 MB decoded)
``/_hostile/huge/x.png?mb=N``       200, declares and streams N MB (default 40): over the size cap
``/_hostile/trickle-headers/x?s=S`` the response headers one byte per 0.2 s for S s, then a PNG
``/_hostile/trickle-body/x?s=S``    headers, then the PNG body one byte per 0.2 s for S s
``/_hostile/endless/x.png?s=S``     a body without length, 1 kB per 0.2 s for S s (default 60)
``/_hostile/short/x.png``           Content-Length of a PNG, half of it, then the connection closes
==================================  ============================================================

The last 100k request paths are kept in :attr:`WorldServer.requests` (tests check what was fetched).
"""
from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from reco.errors import ConfigError
from reco.world.bombs import bpp_bomb, pixel_bomb, valid_png

log = logging.getLogger(__name__)
MAX_SLOW_SECONDS = 60.0
TRICKLE_STEP = 0.2              # seconds between two trickled bytes
IDENTITY_PATH = "/_reco/identity"   # serves the server's per-run token (reco.world.serving)
MAX_HUGE_MB = 256


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when nothing is bound to ``host:port`` (a listener anywhere on the port included)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_loopback(host: str) -> str:
    """``host`` resolved to a loopback IPv4 address, or ConfigError."""
    try:
        addr = socket.gethostbyname(host)
        loopback = ipaddress.ip_address(addr).is_loopback
    except (OSError, ValueError):
        loopback = False
    if not loopback:
        raise ConfigError(f"world.host={host!r}: the world server binds loopback addresses only "
                          f"(e.g. 127.0.0.1)")
    return addr


def _valid_png() -> bytes:
    return valid_png()


def _bomb() -> bytes:
    """The pixel bomb (:mod:`reco.world.bombs`), computed once; :meth:`WorldServer.start` warms
    it in the background so a request never waits for it."""
    return pixel_bomb()


def _warm_bombs() -> None:
    pixel_bomb()
    bpp_bomb()


class _Handler(SimpleHTTPRequestHandler):
    server_version = "reco-world/1"
    stopping: threading.Event          # set per server class
    requests: collections.deque        # last paths served, per server (append is thread-safe)
    token: str                         # this server's identity, served at IDENTITY_PATH

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):  # noqa: N802
        self.requests.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == IDENTITY_PATH:
            return self._send(self.token.encode(), "text/plain")
        if parts.path.startswith("/_hostile/"):
            try:
                return self._hostile(parts.path.split("/")[2], parse_qs(parts.query))
            except (BrokenPipeError, ConnectionResetError):
                return None
        return super().do_GET()

    def send_head(self):
        """Files under the served folder only: a symlink that leads out of it is not followed."""
        real = os.path.realpath(self.translate_path(self.path))
        root = os.path.realpath(self.directory)
        if real != root and not real.startswith(root + os.sep):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(404, "File not found")           # no folder listings
        return None

    def _hostile(self, kind: str, query: dict) -> None:
        handler = {
            "404": lambda: self.send_error(404, "hostile: not found"),
            "500": lambda: self.send_error(500, "hostile: server error"),
            "garbage": lambda: self._send(b"this is not an image\x00\xff" * 40),
            "truncated": lambda: self._send(_valid_png()[: len(_valid_png()) // 2]),
            "slow": lambda: self._slow(query),
            "redirect-loop": lambda: self._redirect(query),
            "redirect": lambda: self._redirect_to(query),
            "bomb": lambda: self._send(_bomb()),
            "bpp-bomb": lambda: self._send(bpp_bomb()),
            "huge": lambda: self._huge(query),
            "trickle-headers": lambda: self._trickle(query, headers=True),
            "trickle-body": lambda: self._trickle(query, headers=False),
            "endless": lambda: self._endless(query),
            "short": lambda: self._short(),
        }.get(kind)
        if handler is None:
            self.send_error(404, f"unknown hostile endpoint {kind!r}")
        else:
            handler()

    def _send(self, data: bytes, ctype: str = "image/png") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _slow(self, query: dict) -> None:
        try:
            seconds = float(query.get("s", ["5"])[0])
        except ValueError:
            seconds = 5.0
        if self.stopping.wait(min(max(seconds, 0.0), MAX_SLOW_SECONDS)):
            return                                   # server stopping: drop the request
        self._send(_valid_png())

    def _seconds(self, query: dict, default: float = 5.0) -> float:
        try:
            return min(max(float(query.get("s", [default])[0]), 0.0), MAX_SLOW_SECONDS)
        except ValueError:
            return default

    def _drip(self, data: bytes, seconds: float) -> bool:
        """Write ``data`` one byte per TRICKLE_STEP for at most ``seconds``; False if stopped."""
        end = time.monotonic() + seconds
        for i in range(len(data)):
            if time.monotonic() >= end:
                self.wfile.write(data[i:])
                return True
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if self.stopping.wait(TRICKLE_STEP):
                return False
        return True

    def _trickle(self, query: dict, headers: bool) -> None:
        """Headers (or the body) one byte at a time for ``s`` seconds, then the rest."""
        body = _valid_png()
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n"
                f"X-Padding: {'x' * 200}\r\n\r\n").encode()
        self.close_connection = True
        if headers:
            if self._drip(head, self._seconds(query)):
                self.wfile.write(body)
        else:
            self.wfile.write(head)
            self._drip(body, self._seconds(query))

    def _endless(self, query: dict) -> None:
        """A body without length that never ends: 1 kB every TRICKLE_STEP for ``s`` seconds."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.close_connection = True
        end = time.monotonic() + self._seconds(query, MAX_SLOW_SECONDS)
        self.wfile.write(_valid_png()[:8])
        while time.monotonic() < end and not self.stopping.wait(TRICKLE_STEP):
            self.wfile.write(b"\x00" * 1024)

    def _short(self) -> None:
        """Content-Length of a whole PNG, then half of it, then the connection closes."""
        body = _valid_png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True

    def _redirect(self, query: dict) -> None:
        n = int(query.get("n", ["0"])[0]) if query.get("n", ["0"])[0].isdigit() else 0
        self.send_response(302)
        self.send_header("Location", f"{urlsplit(self.path).path}?n={n + 1}")
        self.send_header("Content-Length", "0")
        self.end_headers()


    def _redirect_to(self, query: dict) -> None:
        self.send_response(302)
        self.send_header("Location", query.get("to", ["/"])[0])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _huge(self, query: dict) -> None:
        try:
            mb = min(max(int(query.get("mb", ["40"])[0]), 1), MAX_HUGE_MB)
        except ValueError:
            mb = 40
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(mb << 20))
        self.end_headers()
        block = _valid_png()[:8] + b"\x00" * ((1 << 20) - 8)
        for _ in range(mb):
            if self.stopping.is_set():
                return
            self.wfile.write(block)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        log.debug("world server: error serving %s", client_address, exc_info=True)


class WorldServer:
    """Serve ``root`` over HTTP on a loopback address, as a context manager.

    Args:
        root: folder whose files are served (the world folder).
        host: loopback address to bind (anything else is a ConfigError).
        port: TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.host = host
        self.address = check_loopback(host)
        self._requested_port = int(port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.requests: collections.deque[str] = collections.deque(maxlen=100_000)
        self.token = secrets.token_hex(16)          # per run: who answers on the port is checked

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("WorldServer is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "WorldServer":
        if self._server is not None:
            return self
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"stopping": self._stopping, "requests": self.requests,
                                                "token": self.token})
        factory = functools.partial(handler, directory=str(self.root))
        try:
            self._server = _Server((self.address, self._requested_port), factory)
        except OSError as exc:
            raise ConfigError(f"world server: cannot bind {self.host}:{self._requested_port}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"world-server-{self.port}", daemon=True)
        self._thread.start()
        threading.Thread(target=_warm_bombs, name="world-server-bombs", daemon=True).start()
        log.debug("serving %s on %s", self.root, self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> "WorldServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
