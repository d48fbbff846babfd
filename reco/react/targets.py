"""The locked text tower's caption embeddings of each customisation shard, computed once per run.

REACT's targets are the frozen text tower's embeddings of the captions; the tower never changes,
so ``react-train`` embeds every shard's captions once (each DDP rank a share of the shards, in
batches) into ``OUT/targets/`` and the stream looks each sample's target up by key instead of
running the text tower on every batch of every epoch (what the in-memory path does too).

One Parquet file per tar: ``key`` (the tar's ``__key__``) and ``target`` (float32, the embedding
dimension), named by a digest of the tar (path, size, modification time) and the model's
identity, so a changed tar or another CLIP gets new targets and a resumed run reuses them.
Read back with :func:`read_targets`, which validates the schema and names the file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.storage import atomic_write_table

FORMAT = b"react-caption-targets/1"


def targets_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("key", pa.string()), pa.field("target", pa.list_(pa.float32(), dim))],
                     metadata={b"reco.format": FORMAT})


def tar_captions(tar: str) -> tuple[list[str], list[str]]:
    """(keys, captions) of the samples of one tar that hold a caption (images are not decoded)."""
    import webdataset as wds

    keys, captions = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList([tar]), wds.tarfile_to_samples()):
        if "txt" in sample:
            text = sample["txt"]
            keys.append(sample["__key__"])
            captions.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
    return keys, captions


def read_targets(path: str | Path) -> tuple[dict[str, int], np.ndarray]:
    """({key: row}, (rows, dim) float32) of one targets file; FormatError naming it."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: unreadable caption targets ({exc})") from exc
    meta = table.schema.metadata or {}
    if meta.get(b"reco.format") != FORMAT or table.schema.names != ["key", "target"]:
        raise FormatError(f"{path}: not a react caption-targets file (format "
                          f"{meta.get(b'reco.format')!r}, columns {table.schema.names})")
    column = table.column("target").combine_chunks()
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise FormatError(f"{path}: duplicate keys")
    return {k: i for i, k in enumerate(keys)}, np.ascontiguousarray(values, dtype=np.float32)


class CaptionTargets:
    """Where the caption targets of a run live (``folder``) for the model ``model_id``; picklable
    (DataLoader workers load a shard's targets with :meth:`lookup`)."""

    def __init__(self, folder: str | Path, model_id: str):
        self.folder, self.model_id = Path(folder), model_id
        self._current: tuple[str, dict[str, int], np.ndarray] | None = None

    def path(self, tar: str) -> Path:
        st = os.stat(tar)
        digest = hashlib.sha256(f"{os.path.abspath(tar)}|{st.st_size}|{st.st_mtime_ns}|"
                                f"{self.model_id}".encode()).hexdigest()[:20]
        return self.folder / f"{Path(tar).stem}-{digest}.parquet"

    def build(self, tars: list[str], encode, *, rank: int = 0, world: int = 1) -> int:
        """Embed the captions of this rank's share of ``tars`` whose targets are missing (``encode``:
        captions -> (n, dim) tensor); returns how many shards were embedded."""
        done = 0
        for tar in tars[rank::world]:
            path = self.path(tar)
            if path.is_file():
                continue
            keys, captions = tar_captions(tar)
            vectors = encode(captions).float().cpu().numpy() if captions else np.zeros((0, 1), np.float32)
            dim = vectors.shape[1]
            flat = pa.array(vectors.reshape(-1), type=pa.float32())
            table = pa.Table.from_arrays([pa.array(keys, pa.string()),
                                          pa.FixedSizeListArray.from_arrays(flat, dim)],
                                         schema=targets_schema(dim))
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_table(table, path)
            done += 1
        return done

    def lookup(self, tar: str, key: str) -> np.ndarray:
        """The target of sample ``key`` of ``tar`` (one shard's file held at a time: samples come
        out of a tar together, before the shuffle buffer)."""
        if self._current is None or self._current[0] != tar:
            index, values = read_targets(self.path(tar))
            self._current = (tar, index, values)
        _, index, values = self._current
        row = index.get(key)
        if row is None:
            raise FormatError(f"{self.path(tar)}: no caption target for sample {key!r} of {tar}")
        return values[row]

    def __getstate__(self):
        return {"folder": self.folder, "model_id": self.model_id, "_current": None}
