"""Fault injection for the stage CLIs: run ``reco <stage>`` in a subprocess, SIGKILL it, check
what the next stage could see, rerun.

Two ways to kill (both a real ``SIGKILL``, nothing is flushed or cleaned up):

* at a commit (:class:`KillAt`): ``python -m tests.fault_tools <reco args>`` is ``reco`` with
  ``os.rename``/``os.replace`` (the commit point of every atomic writer: temporary name ->
  final name) wrapped; the process kills itself just ``before`` or ``after`` the n-th commit
  whose final name matches a glob. Deterministic: the kill always lands mid-run.
* after a delay (``kill_after_commits`` + ``delay``): the test process kills the child a random
  delay after its n-th commit, wherever it then is (mid-write of a temporary file, mid-step...).

Every commit is appended to a log file (``RECO_FAULT_LOG``), which is how the test knows
what the killed run had finished. While a stage runs, :class:`Watcher` lists its output folders
again and again and checks that every visible final-named file is complete and readable and that
every visible manifest lists only shards that are on disk and readable.
"""
from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_KILL, ENV_LOG = "RECO_FAULT_KILL", "RECO_FAULT_LOG"
IGNORED_DIRS = {"tb"}                 # TensorBoard event files: append-only logs, not stage output


# ---------------------------------------------------------------------------------------------
# in the child: commit hooks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KillAt:
    """Kill the stage just ``when`` ("before"|"after") the ``n``-th commit to a final name
    matching ``pattern`` (a glob on the file or folder name)."""

    pattern: str
    n: int
    when: str = "before"

    def encode(self) -> str:
        return json.dumps([self.pattern, self.n, self.when])


def install_hooks(kill: KillAt | None, log_path: str | None) -> None:
    """Wrap os.rename/os.replace: log each commit to a final name, kill at ``kill``."""
    count, lock = [0], threading.Lock()

    def log(event: str, dst: str) -> None:
        if log_path:
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{event}\t{dst}\n".encode())
            finally:
                os.close(fd)

    def die(dst: str) -> None:
        log("kill", dst)
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(original):
        def commit(src, dst, *args, **kwargs):
            name = os.path.basename(os.fsdecode(dst).rstrip("/"))
            hit = False
            if not name.startswith("."):
                with lock:
                    count[0] += kill is not None and fnmatch.fnmatch(name, kill.pattern)
                    hit = kill is not None and count[0] == kill.n and fnmatch.fnmatch(name, kill.pattern)
                if hit and kill.when == "before":
                    die(os.fsdecode(dst))
            result = original(src, dst, *args, **kwargs)
            if not name.startswith("."):
                log("commit", os.fsdecode(dst))
                if hit and kill.when == "after":
                    die(os.fsdecode(dst))
            return result
        return commit

    os.rename, os.replace = wrap(os.rename), wrap(os.replace)


def child_main(argv: list[str]) -> int:
    raw = os.environ.get(ENV_KILL)
    kill = KillAt(*json.loads(raw)) if raw else None
    install_hooks(kill, os.environ.get(ENV_LOG))
    from reco.cli import main

    return main(argv)


# ---------------------------------------------------------------------------------------------
# in the test: checks of what is visible
# ---------------------------------------------------------------------------------------------

def is_temporary(name: str) -> bool:
    """Names the atomic writers use before the rename (``.part-00001.parquet.tmp-1a2b3c4d``)."""
    return name.startswith(".")


def check_file(path: Path) -> None:
    """Raise unless ``path`` is a complete, readable file of its type."""
    suffix = path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.read_table(path)
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".npy":
        import numpy as np

        np.load(path, allow_pickle=False)
    elif suffix == ".index":
        import faiss

        faiss.read_index(str(path))
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        load_file(str(path))
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as img:
            img.load()
    elif suffix in (".md", ".html", ".txt"):
        if not path.read_bytes().decode("utf-8").strip():
            raise ValueError("empty text file")


def check_manifest(folder: Path) -> int:
    """A visible manifest lists only shards that are on disk and readable; returns their rows."""
    import pyarrow.parquet as pq

    data = json.loads((folder / "manifest.json").read_text())
    rows = 0
    for name in data["shards"]:
        rows += pq.read_table(folder / name).num_rows
    return rows


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def check_tree(roots: list[Path], seen: dict | None = None) -> tuple[int, list[str], list[str]]:
    """Check every final-named file/checkpoint under ``roots``.

    Returns (number of checks made, problems, temporaries seen). ``seen`` caches
    (path -> (mtime, size)) of files already found complete, so a watcher re-checks only what
    changed. A file that vanishes between listing and reading is not a problem (replaced or
    removed by the stage, atomically).
    """
    seen = {} if seen is None else seen
    checks, problems, temps = 0, [], []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if d not in IGNORED_DIRS]
            temps += [str(here / d) for d in dirnames if is_temporary(d)]
            dirnames[:] = [d for d in dirnames if not is_temporary(d)]
            if here.name.startswith("step-") and here.parent.name == "checkpoints":
                missing = [f for f in CHECKPOINT_FILES if f not in filenames]
                if missing:
                    problems.append(f"{here}: checkpoint visible without {missing}")
            for name in filenames:
                path = here / name
                if is_temporary(name):
                    temps.append(str(path))
                    continue
                try:
                    stat = path.stat()
                    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                    if seen.get(path) == key:
                        continue
                    check_file(path)
                    if name == "manifest.json":
                        check_manifest(here)
                    seen[path] = key
                    checks += 1
                except FileNotFoundError:
                    continue
                except Exception as exc:                 # noqa: BLE001 - any failure is a finding
                    problems.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
    return checks, problems, temps


class Watcher(threading.Thread):
    """Lists ``roots`` every ``interval`` s while a stage runs; collects problems (which a
    next stage starting at that moment would have hit)."""

    def __init__(self, roots: list[Path], interval: float = 0.05):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.stop = threading.Event()
        self.scans = self.checks = 0
        self.problems: list[str] = []
        self.seen: dict = {}

    def run(self) -> None:
        while not self.stop.is_set():
            checks, problems, _ = check_tree(self.roots, self.seen)
            self.scans += 1
            self.checks += checks
            self.problems += [p for p in problems if p not in self.problems]
            self.stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------
# in the test: running a stage
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    rc: int
    seconds: float
    commits: list[str]
    killed_at: str | None
    output: str
    watch_scans: int = 0
    watch_checks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def stage_env() -> dict[str, str]:
    """One CPU thread per process (torch, faiss/OpenMP, BLAS): the suite shares small machines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop(ENV_KILL, None)
    return env


def run_stage(args: list[str], *, log: Path, watch: list[Path], kill: KillAt | None = None,
              kill_after_commits: int | None = None, delay: float = 0.0,
              timeout: float = 600) -> Run:
    """Run ``reco <args>`` (through this module) to its end or to its kill.

    Args:
        kill: the child kills itself at this commit.
        kill_after_commits, delay: the test kills the child ``delay`` s after its
            ``kill_after_commits``-th commit (if it is still running then).
    """
    env = stage_env()
    env[ENV_LOG] = str(log)
    if kill is not None:
        env[ENV_KILL] = kill.encode()
    start_line = len(_read_log(log))
    watcher = Watcher(watch)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fault_tools", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    watcher.start()
    try:
        if kill_after_commits is not None:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                done = [e for e in _read_log(log)[start_line:] if e[0] == "commit"]
                if len(done) >= kill_after_commits:
                    time.sleep(delay)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.stop.set()
        watcher.join()
        reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    events = _read_log(log)[start_line:]
    killed_at = next((dst for ev, dst in events if ev == "kill"), None)
    if rc == -signal.SIGKILL and killed_at is None:
        killed_at = "(by the test, after a delay)"
    return Run(rc=rc, seconds=seconds, commits=[dst for ev, dst in events if ev == "commit"],
               killed_at=killed_at, output=b"".join(out_chunks).decode(errors="replace")[-4000:],
               watch_scans=watcher.scans, watch_checks=watcher.checks, problems=watcher.problems)


def _read_log(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split("\t", 1)) for line in log.read_text().splitlines() if "\t" in line]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
