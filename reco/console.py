"""The terminal: reco's own log lines, progress bars and stage summaries, in one place.

* :func:`setup_logging` (called once by ``reco.cli.main``): the ``reco`` loggers at INFO, every
  other library at WARNING (``-v``: reco at DEBUG, libraries at INFO; ``-vv``: everything at
  DEBUG; ``-q``: reco at WARNING, libraries at ERROR, no bars). Log lines go to stderr through
  tqdm, so they never break a progress bar.
* :func:`progress`: a tqdm bar with ETA on stderr, shown on a terminal only and never with ``-q``;
  erased when done (the stage summary says how long it took).
* :func:`tracked` / :func:`advance`: a bar the driver owns and Beam DoFns advance by a key
  (e.g. the output folder). A DoFn running in another process (multi-process or remote runner)
  finds no bar and the caller logs a per-shard line instead.
* :func:`captured_output`: what a library prints (img2dataset's banners, autofaiss's bars) goes
  to the log at DEBUG instead of the terminal; per thread, so Beam's worker threads are safe.
* :func:`print_summary`: one summary per stage, one format: a title line, then aligned
  ``key  value`` lines, on stdout (``--json``: one JSON line with the stage's full info).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from typing import Any, Iterable, Iterator, TextIO

LOGGER = "reco"
QUIET, NORMAL, VERBOSE, DEBUG = -1, 0, 1, 2
# verbosity -> (level of reco's loggers, level of everything else)
LEVELS = {QUIET: (logging.WARNING, logging.ERROR), NORMAL: (logging.INFO, logging.WARNING),
          VERBOSE: (logging.DEBUG, logging.INFO), DEBUG: (logging.DEBUG, logging.DEBUG)}
_state: dict[str, Any] = {"verbosity": NORMAL, "json": False}
_bars: dict[str, Any] = {}
_bars_lock = threading.Lock()


def verbosity() -> int:
    return _state["verbosity"]


def is_quiet() -> bool:
    return _state["verbosity"] <= QUIET


def json_summaries() -> bool:
    return bool(_state["json"])


class _TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write``: open bars are cleared, the line is printed, and the bars
    are drawn again below it. ``stream`` None: sys.stderr as it is at each write (pytest and
    redirections swap it)."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            stream = self.stream or sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """``HH:MM:SS message`` for reco's INFO lines; level and logger name otherwise (and with -v)."""

    def __init__(self, detailed: bool):
        super().__init__(datefmt="%H:%M:%S")
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        own = record.name == LOGGER or record.name.startswith(LOGGER + ".")
        if self.detailed or not own or record.levelno >= logging.WARNING:
            self._style._fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        else:
            self._style._fmt = "%(asctime)s %(message)s"
        return super().format(record)


def setup_logging(verbosity: int = NORMAL, *, json_summaries: bool = False,
                  stream: TextIO | None = None) -> None:
    """Configure logging for the command line (see the module docstring); idempotent.

    Args:
        verbosity: QUIET (-1, ``-q``), NORMAL (0), VERBOSE (1, ``-v``), DEBUG (2, ``-vv``).
        json_summaries: ``--json``: :func:`print_summary` prints one JSON line per stage.
        stream: where log lines go (default: stderr at the time of each write).
    """
    verbosity = max(QUIET, min(DEBUG, int(verbosity)))
    _state.update(verbosity=verbosity, json=bool(json_summaries))
    own, others = LEVELS[verbosity]
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_reco", False)]:
        root.removeHandler(handler)
    handler = _TqdmHandler(stream)
    handler._reco = True                  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter(detailed=verbosity >= VERBOSE))
    root.addHandler(handler)
    root.setLevel(others)
    logging.getLogger(LOGGER).setLevel(own)
    logging.captureWarnings(True)         # warnings.warn(...) -> the "py.warnings" logger
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")      # tensorboard's TensorFlow probe


def bars_enabled() -> bool:
    """Bars on a terminal only, never with -q; ``RECO_PROGRESS=1``/``0`` forces them on/off
    (e.g. on for a CI log)."""
    if is_quiet():
        return False
    forced = os.environ.get("RECO_PROGRESS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", leave: bool = False, **kwargs):
    """A tqdm bar with ETA on stderr (disabled off a terminal and with -q; see :func:`bars_enabled`).

    Args:
        iterable / total / desc / unit: as for tqdm.
        leave: keep the finished bar on screen (default: erase it; the summary gives the time).
        kwargs: more tqdm options (``initial``, ``postfix``...).
    """
    from tqdm import tqdm

    kwargs.setdefault("disable", not bars_enabled())
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, **kwargs)


@contextlib.contextmanager
def tracked(key: str, *, total: int, desc: str, unit: str = "it") -> Iterator[Any]:
    """A :func:`progress` bar that :func:`advance` (e.g. from a Beam DoFn in this process) moves."""
    bar = progress(total=total, desc=desc, unit=unit)
    with _bars_lock:
        _bars[str(key)] = bar
    try:
        yield bar
    finally:
        with _bars_lock:
            _bars.pop(str(key), None)
        bar.close()


def advance(key: str, n: int = 1, **postfix: Any) -> bool:
    """Advance the bar tracked under ``key``; False when this process holds none (the caller
    then logs its own per-shard line)."""
    with _bars_lock:
        bar = _bars.get(str(key))
        if bar is None:
            return False
        bar.update(n)
        if postfix:
            bar.set_postfix(postfix, refresh=False)
    return True


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: writes of a thread inside :func:`captured_output` go
    to that thread's buffer, every other write to the stream it replaced."""

    def __init__(self, target: TextIO):
        super().__init__()
        self.target = target
        self.local = threading.local()

    def _sink(self) -> TextIO:
        return getattr(self.local, "buffer", None) or self.target

    def write(self, text: str) -> int:
        return self._sink().write(text)

    def flush(self) -> None:
        self._sink().flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        sink = self._sink()
        return sink is self.target and bool(getattr(sink, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self):                  # tqdm draws unicode bars only on a utf-8 stream
        return getattr(self.target, "encoding", None)

    def __getattr__(self, name: str):
        return getattr(self.target, name)


_router_lock = threading.Lock()


def _router(name: str) -> _ThreadRouter:
    with _router_lock:
        current = getattr(sys, name)
        if not isinstance(current, _ThreadRouter):
            current = _ThreadRouter(current)
            setattr(sys, name, current)
        return current


@contextlib.contextmanager
def captured_output(logger: logging.Logger, level: int = logging.DEBUG) -> Iterator[None]:
    """What this thread prints to stdout/stderr meanwhile goes to ``logger`` at ``level`` (one
    record per non-empty line, tqdm redraws reduced to their last state) instead of the terminal."""
    routers = [_router("stdout"), _router("stderr")]
    buffer = io.StringIO()
    previous = [getattr(r.local, "buffer", None) for r in routers]
    for r in routers:
        r.local.buffer = buffer
    try:
        yield
    finally:
        for r, old in zip(routers, previous):
            r.local.buffer = old
        if logger.isEnabledFor(level):
            for line in buffer.getvalue().split("\n"):
                line = line.rsplit("\r", 1)[-1].strip()
                if line:
                    logger.log(level, "%s", line)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def dropped(logger_name: str, *fragments: str) -> Iterator[None]:
    """Drop the records of ``logger_name`` (``""``: the root logger, which open_clip logs to)
    that contain one of ``fragments`` (a dependency's warning about something reco does on purpose)."""
    target = logging.getLogger(logger_name or None)
    flt = _DropMessages(fragments)
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def format_summary(title: str, items: dict[str, Any]) -> str:
    """``title`` then one ``  key  value`` line per item (None values left out), keys aligned."""
    items = {k: v for k, v in items.items() if v is not None}
    width = max((len(k) for k in items), default=0)
    return "\n".join([title, *(f"  {k:<{width}}  {_fmt(v)}" for k, v in items.items())])


def print_summary(title: str, items: dict[str, Any], *, data: dict | None = None,
                  file: TextIO | None = None) -> None:
    """Print :func:`format_summary` on stdout (also with -q: it is the command's result); with
    ``--json``, one JSON line ``{"stage": title, **data}`` instead (``data``: the stage's full
    info, default ``items``)."""
    import json

    from tqdm import tqdm

    out = file or sys.stdout
    if _state["json"]:
        text = json.dumps({"stage": title, **(items if data is None else data)}, default=str)
    else:
        text = format_summary(title, items)
    tqdm.write(text, file=out)
    out.flush()


def seconds(value: float | None) -> str | None:
    """``12.3 s`` / ``2 min 05 s`` (None stays None)."""
    if value is None:
        return None
    value = float(value)
    return f"{value:.1f} s" if value < 60 else f"{int(value // 60)} min {int(value % 60):02d} s"
