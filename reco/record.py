"""The run record: one ``record.json`` per stage output, for relocation, option memory and
integrity.

Format ``reco.record/1`` (declared here once, validated on read by :meth:`Record.read`)::

    {"format": "reco.record/1",
     "stage": "embed" | "index" | "neighbours" | "train" | "evaluate" | ...,
     "options": {"embed.shard_size": 500, ...},   # the options that shape the output
     "inputs": {"urls/memory.parquet": "sha256:...", "memory": "sha256:..."},
     "model_id": "reco-tiny|sha256:...",          # what the model IS (reco.clip.model_identity)
     "outputs": {"part-00000.parquet": {"sha256": "sha256:...", "rows": 500}, ...},
     "counts": {...},                              # stage-specific totals
     "complete": true}

* Paths of ``outputs`` are relative to the record's folder; ``inputs`` are named, never by an
  absolute path: a record (hence a run) can be moved or copied and stays valid.
* An input is a file digest (``sha256:`` of its bytes) or the :meth:`Record.digest` of an
  upstream record (which covers the digests of all its outputs: a chain, like a Merkle tree).
* A rerun compares its options, inputs and model with the record (:meth:`Record.check_same`): any
  difference is a :class:`StaleError` naming the option or input and the ``--force`` that redoes
  the stage; outputs are checked against their digests (:meth:`Record.verify`) before they are
  reused or read, so a file replaced after it was written is detected, never silently used.
* One writer per output folder: :func:`locked` (``fcntl.flock`` on ``.lock``; released by the
  kernel when the process dies, so a killed run leaves no stale lock).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from reco import options as o
from reco.errors import ConfigError, FormatError, MismatchError, RecoError

FORMAT = "reco.record/1"
FILE = "record.json"
LOCK_FILE = ".lock"
_KEYS = {"format": str, "stage": str, "options": dict, "inputs": dict, "model_id": str,
         "outputs": dict, "counts": dict, "complete": bool}


class StaleError(MismatchError):
    """Existing outputs were made with other options, inputs or model (names what differs)."""


class LockedError(RecoError):
    """Another process writes the same output (names its pid)."""


# ---------------------------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes (cached per process by inode, size and mtime)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[key]


def json_digest(value: Any) -> str:
    """``sha256:<hex>`` of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def options_of(section_name: str, section: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``{"section.option": value}`` of a config dataclass (nested ones flattened), JSON values,
    without the options in ``exclude`` (those that do not change the output: threads, runner)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        if f.name in exclude:
            continue
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(options_of(f"{section_name}.{f.name}", value))
        else:
            out[f"{section_name}.{f.name}"] = json.loads(json.dumps(value, default=str))
    return out


# ---------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------

@dataclass
class Record:
    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def digest(self) -> str:
        """What downstream records name as their input: covers options, inputs, model and the
        digest of every output (not the folder's location)."""
        return json_digest({k: v for k, v in self.to_dict().items() if k != "complete"})

    def write(self, folder: str | Path) -> None:
        from reco.storage import atomic_write_text

        atomic_write_text(Path(folder) / FILE, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def read(cls, folder: str | Path, stage: str | None = None) -> "Record | None":
        """The record of ``folder`` (None when there is none), validated: FormatError naming
        the file for bad JSON, a missing or ill-typed key, another format or stage."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: not a readable record ({exc}); rerun the stage with --force") from exc
        if not isinstance(data, dict):
            raise FormatError(f"{path}: expected a JSON object")
        for key, typ in _KEYS.items():
            if not isinstance(data.get(key), typ):
                raise FormatError(f"{path}: key {key!r} missing or not a {typ.__name__}")
        if data["format"] != FORMAT:
            raise FormatError(f"{path}: record format {data['format']!r}, expected {FORMAT!r}")
        if stage is not None and data["stage"] != stage:
            raise FormatError(f"{path}: record of stage {data['stage']!r}, expected {stage!r}")
        for name, out in data["outputs"].items():
            if (not isinstance(out, dict) or not isinstance(out.get("sha256"), str)
                    or os.path.isabs(name) or ".." in Path(name).parts):
                raise FormatError(f"{path}: bad output entry {name!r}")
        return cls(**{k: data[k] for k in _KEYS if k != "format"})

    # -----------------------------------------------------------------------------------------
    def check_same(self, folder: str | Path, *, options: dict[str, Any], inputs: dict[str, str],
                   model_id: str | None, command: str) -> None:
        """StaleError unless this record was made with these options, inputs and model; the
        message names what differs and ``reco {command} --force``."""
        where = Path(folder) / FILE
        redo = f"rerun `reco {command} --force` to redo them"
        if model_id is not None and self.model_id and self.model_id != model_id:
            raise StaleError(f"{where}: outputs made with model {self.model_id!r}, now "
                             f"{model_id!r} (another model or replaced weights); {redo}")
        changed = sorted(k for k in (set(options) | set(self.options)) - o.RETIRED
                         if self.options.get(k, "<absent>") != options.get(k, "<absent>"))
        if changed:
            what = ", ".join(f"{k} (recorded {self.options.get(k, '<absent>')!r}, now "
                             f"{options.get(k, '<absent>')!r})" for k in changed)
            raise StaleError(f"{where}: option(s) {what} differ from those its outputs were made "
                             f"with; {redo}")
        moved = sorted(k for k in set(inputs) | set(self.inputs) if self.inputs.get(k) != inputs.get(k))
        if moved:
            what = ", ".join(f"{k} ({_short(self.inputs.get(k))} recorded, now {_short(inputs.get(k))})"
                             for k in moved)
            raise StaleError(f"{where}: input(s) {what} changed since its outputs were made; {redo}")

    def verify(self, folder: str | Path, names: Iterable[str] | None = None, *,
               command: str) -> None:
        """FormatError naming the file unless each output (``names``: a subset) is on disk with
        its recorded digest (and row count, where the caller checks rows)."""
        folder = Path(folder)
        for name in (self.outputs if names is None else names):
            entry = self.outputs.get(name)
            path = folder / name
            if entry is None:
                raise FormatError(f"{path}: not among the outputs recorded in {folder / FILE}; "
                                  f"rerun `reco {command} --force`")
            if not path.is_file():
                raise FormatError(f"{path}: recorded in {folder / FILE} but missing; "
                                  f"rerun `reco {command}` (or with --force)")
            got = file_digest(path)
            if got != entry["sha256"]:
                raise FormatError(f"{path}: content differs from the record ({_short(got)}, "
                                  f"recorded {_short(entry['sha256'])}): replaced or changed after "
                                  f"`reco {command}` wrote it; rerun `reco {command} --force`")


def _short(digest: str | None) -> str:
    return "absent" if digest is None else digest[:19]


def outputs_of(folder: str | Path, names: Iterable[str], rows: dict[str, int] | None = None
               ) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "rows"?}}`` of files under ``folder`` (names relative to it)."""
    out = {}
    for name in names:
        entry: dict[str, Any] = {"sha256": file_digest(Path(folder) / name)}
        if rows is not None and name in rows:
            entry["rows"] = int(rows[name])
        out[name] = entry
    return out


def input_digest(folder: str | Path, stage: str, *, command: str, verify: bool = True) -> str | None:
    """The digest an upstream output contributes to a downstream record: its record's digest
    (after checking every output file against it), or None when it has no record (an output
    written by other tools: its manifest is all there is)."""
    record = Record.read(folder, stage)
    if record is None:
        return None
    if not record.complete:
        raise FormatError(f"{Path(folder) / FILE}: the {stage} output is incomplete; "
                          f"rerun `reco {command}` to finish it")
    if verify:
        record.verify(folder, command=command)
    return record.digest()


# ---------------------------------------------------------------------------------------------
# one writer per output
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder/.lock`` while the block runs; another holder
    is a :class:`LockedError` "another `reco {what}` is already running (pid N)". The kernel
    releases the lock when its process dies, so a killed run's lock never blocks a rerun; the
    file is removed on release (a killed run's is removed by the next writer).
    Folders on remote filesystems (``scheme://``) are not locked."""
    import fcntl

    if "://" in str(folder):
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output {folder}: not writable ({exc})") from exc
    fd = _acquire(folder / LOCK_FILE, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):              # unlink while held: no leftover file
            (folder / LOCK_FILE).unlink()
            if created and not any(folder.iterdir()):
                folder.rmdir()                          # refused before any work: leave nothing
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its exclusive flock. A lock file unlinked by its
    releasing holder between our open and flock is not the lock any more: open it again."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"output {path.parent}: not writable ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockedError(f"{path.parent}: another `reco {what}` is already running (pid {pid}); "
                              f"wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
