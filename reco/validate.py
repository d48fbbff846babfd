"""The validated reading every artefact reader builds on: one :class:`~reco.errors.FormatError`
(or :class:`~reco.errors.MismatchError`) naming the file, never a raw pyarrow/json/KeyError
traceback.

* :func:`read_json`: JSON objects with typed required keys (index ``info.json``:
  :data:`INDEX_INFO_KEYS`, ``heads.json``: :data:`HEADS_META_KEYS`, checkpoint ``state.json``:
  :data:`CHECKPOINT_STATE_KEYS`);
* :func:`load_npy`: ``.npy`` arrays without pickles, dtype/ndim checked;
* :func:`check_ids` (an ``id`` column: non-null, unique), :func:`check_dim`, :func:`check_same_model`, :func:`check_config_match`, :func:`check_vectors`:
  mismatch checks.

The one reader of each artefact (the function every stage and ``tests/test_formats_properties.py``
call) is listed in RELIABILITY.md: embedded shards :mod:`reco.embedded`, neighbour ids
:func:`reco.pipelines.neighbours.shards.read_ids`, trainer tensors :mod:`reco.trainer.tensors`,
the memory index :class:`reco.index.memory.Memory`, heads :func:`reco.trainer.checkpoint.load_heads`,
manifests :meth:`reco.formats.Manifest.read`, URL lists :func:`reco.pipelines.urls.inspect_url_files`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from reco.errors import FormatError, MismatchError
from reco.formats import check_finite

READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, pa.ArrowException)
INDEX_INFO_KEYS = {"model_id": str, "dim": int, "n": int}
CHECKPOINT_STATE_KEYS = {"step": int, "train": dict, "world_size": int, "data": dict,
                         "optimizer": dict}
# ``fields`` is informative (the model reads the contexts from ``train``), so not required
HEADS_META_KEYS = {"dim": int, "k": int, "model_id": str, "fusion": str, "sides": list,
                   "train": dict}


def read_json(path: str | Path, required: dict[str, type | tuple] | None = None) -> dict:
    """A JSON object from ``path`` with ``required`` keys of the given types (int accepts no bool)."""
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, typ in (required or {}).items():
        if key not in data:
            raise FormatError(f"{path}: missing key {key!r}")
        value = data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, float)):
            raise FormatError(f"{path}: key {key!r} is {value!r}, expected {getattr(typ, '__name__', typ)}")
    return data


def load_npy(path: str | Path, *, dtype: Any = None, ndim: int | None = None, mmap: bool = False) -> np.ndarray:
    """np.load without pickles; a corrupt file, object array, wrong dtype/ndim -> FormatError."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError...
        raise FormatError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise FormatError(f"{path}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and array.ndim != ndim:
        raise FormatError(f"{path}: shape {array.shape}, expected {ndim} dimension(s)")
    return array


def check_dim(got: int, expected: int, where: str, what: str = "embedding dimension") -> None:
    if int(got) != int(expected):
        raise MismatchError(f"{where}: {what} {got}, expected {expected} (artefacts of another model?)")


def check_same_model(got: str | None, expected: str | None, where: str) -> None:
    """MismatchError when two recorded model ids differ (an empty id is not compared)."""
    if got and expected and got != expected:
        raise MismatchError(f"{where}: made with model {got!r}, expected {expected!r}; rebuild it "
                            f"with the same model")


def check_config_match(saved: dict, current: dict, where: str, ignore: tuple[str, ...] = ()) -> None:
    """MismatchError naming every key whose value differs between a saved config (e.g. a
    checkpoint's) and the current one."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} != now {current.get(k)!r}" for k in diff[:5])
        raise MismatchError(f"{where}: config does not match ({detail})")


def check_vectors(vectors: Any, dim: int, where: str) -> np.ndarray:
    """(n, dim) finite float32 array, or FormatError (wrong shape/dimension, NaN/inf row)."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{where}: not a numeric array ({exc})") from exc
    if array.ndim != 2 or array.shape[1] != dim:
        raise FormatError(f"{where}: vectors of shape {array.shape}, expected (n, {dim}) "
                          f"(wrong embedding dimension?)")
    check_finite(array, where)
    return array


def check_ids(ids: Any, where: str) -> None:
    """An ``id`` column of one shard: no nulls, no duplicates (FormatError naming ``where``)."""
    if ids.null_count:
        raise FormatError(f"{where}: column 'id' has {ids.null_count} null(s)")
    values = ids.to_numpy()
    if len(np.unique(values)) != len(values):
        raise FormatError(f"{where}: duplicate ids")
