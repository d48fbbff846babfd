"""One total deadline per URL: connect + headers + body (every redirect hop included).

A socket timeout bounds each read, not the request: a server that trickles one byte per second
keeps every read short and the request alive forever. :class:`Deadline` is armed by
:func:`reco.pipelines.safe_http.fetch` for the calling thread; every connection opened for that
fetch registers its socket (:func:`watch`), gets a timeout no longer than the time left, and is
shut down by a timer when the deadline passes, which ends any read in progress (HTTP or TLS).
The fetch then reports :class:`DeadlineExceeded` ("timed out ...") whatever the read returned.
DNS look-ups cannot be interrupted; they count against the deadline but are not cut short.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

_LOCAL = threading.local()


class DeadlineExceeded(TimeoutError):
    """The URL did not deliver a complete response within its deadline."""


class Deadline:
    """``seconds`` from now; sockets passed to :meth:`watch` are shut down when it passes."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds
        self.expired = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Bound ``sock``'s reads by the time left and shut it down at the deadline (through a
        duplicate descriptor: it still works once TLS has taken the original over)."""
        sock.settimeout(max(self.remaining(), 1e-3))
        dup = sock.dup()
        with self._lock:
            self._watched.append(dup)
            expired = self.expired
        if expired:
            _shutdown(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            watched = list(self._watched)
        for s in watched:
            _shutdown(s)

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"timed out: no complete response within {self.seconds:g} s "
                                f"(embed.timeout: one deadline per URL for connect, headers and body)")

    def __enter__(self) -> "Deadline":
        self._timer.start()
        _LOCAL.deadline = self
        return self

    def __exit__(self, *exc) -> None:
        _LOCAL.deadline = None
        self._timer.cancel()
        with self._lock:
            watched, self._watched = self._watched, []
        for s in watched:
            with contextlib.suppress(OSError):
                s.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def current() -> Deadline | None:
    """The deadline of the fetch running in this thread, if any."""
    return getattr(_LOCAL, "deadline", None)


def connect_timeout(timeout) -> float | object:
    """``timeout`` capped by the time left on this thread's deadline."""
    dl = current()
    if dl is None:
        return timeout
    left = max(dl.remaining(), 1e-3)
    return left if not isinstance(timeout, (int, float)) else min(float(timeout), left)


def watch(sock: socket.socket) -> None:
    dl = current()
    if dl is not None:
        dl.watch(sock)
