"""Files written so that a reader never sees half of one, and file names that cannot escape their
folder (re-exported by :mod:`reco.formats`, whose readers and writers use them).

Every writer goes through :func:`atomic_write_table` / :func:`atomic_write_text`: data is written
to a temporary name (``.<name>.tmp-<hex>``) in the same folder and renamed;
:func:`remove_temporaries` drops what killed writers left. Names read from artefacts (manifests)
or derived from data (URLs, captions) go through :func:`safe_name` / :func:`safe_join`.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _atomic_open(path: str | Path):
    """A binary file object on a temporary name beside ``path`` (any fsspec filesystem), renamed
    to ``path`` once the block completes; removed if it raises."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    fs.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = _tmp_name(fs_path)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, fs_path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def atomic_write_table(table: pa.Table, path: str | Path, **parquet_kwargs: Any) -> None:
    """Write a Parquet file so that ``path`` either does not exist or is complete."""
    with _atomic_open(path) as f:
        pq.write_table(table, f, **parquet_kwargs)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with _atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save_npy(array: np.ndarray, path: str | Path) -> None:
    """np.save through a temporary file (local paths; for memory-mapped reading)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# file names read from artefacts or derived from data (validated readers: reco/validate.py)
# ---------------------------------------------------------------------------------------------

def safe_name(name: Any, where: str) -> str:
    """A plain file name (no folder part, no ``..``, no NUL): what may be joined to an output or
    shard folder. Names read from manifests or derived from URLs/captions go through this."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise FormatError(f"{where}: {name!r} is not a plain file name (it could escape its folder)")
    return name


def safe_join(folder: str | Path, name: Any, where: str | None = None) -> str:
    """``folder/name`` for a :func:`safe_name` ``name`` (FormatError otherwise)."""
    return os.path.join(str(folder), safe_name(name, where or str(folder)))


def remove_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporaries (``.<name>.tmp-<hex>`` files or folders) that writers killed
    before their rename left in ``folder`` (local, not recursive); returns their names. Call it
    only when no writer of that folder can be running (a stage's driver, before it starts)."""
    import shutil

    removed = []
    for path in sorted(Path(folder).glob(".*.tmp-*")) if Path(folder).is_dir() else []:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
