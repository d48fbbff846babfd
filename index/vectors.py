"""The memory's vectors streamed shard by shard to disk, so that build-index never holds them all.

build-index's peak memory is one modality's index plus one bounded batch (issue 21: it was ~7.7x
the float32 data of one modality, reading every shard of both modalities into memory, normalised
and filtered copies beside them):

* :func:`scan_split`: one pass over the memory shards, both modalities read and validated as
  :func:`reco.embedded.read_split` validates them, keeping only the success ids and each image's
  largest cosine with an evaluation image (``reco.index.dedup``);
* :func:`stage`: one modality's L2-normalised kept vectors, shard by shard, into a float32
  ``.npy`` (the index's source: a temporary) and the float16 ``.npy`` the index folder keeps;
* :class:`NpyRows`: rows of a ``.npy`` read with plain file reads, never memory-mapped (mapped
  pages count in the process's resident memory until unmapped);
* :func:`row_batches`: bounded float32 batches of an array or an :class:`NpyRows`.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from reco.embedded import EmbeddedFolder, check_unique, read_shard
from reco.errors import FormatError
from reco.index.dedup import best_similarity

BATCH_BYTES = 16 << 20            # one batch of vectors added/searched at a time (16 MiB)


def normalise_(x: np.ndarray, rows: int = 4096) -> np.ndarray:
    """L2-normalise the rows of a float32 array in place, ``rows`` at a time (the values of
    ``build.normalise``, without its temporaries of the array's size)."""
    for start in range(0, len(x), rows):
        block = x[start:start + rows]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return x


def release_arrow_memory() -> None:
    """Hand back to the system what Arrow's allocator keeps cached after reading shards (it
    reuses it for Arrow buffers only; faiss and numpy allocate elsewhere)."""
    pa.default_memory_pool().release_unused()


def batch_rows(dim: int, batch_bytes: int = BATCH_BYTES) -> int:
    return max(1, batch_bytes // (4 * max(dim, 1)))


def row_batches(vectors, rows: int | None = None):
    """(start, contiguous float32 block) over ``vectors`` (an array or :class:`NpyRows`)."""
    rows = rows or batch_rows(vectors.shape[1])
    for start in range(0, len(vectors), rows):
        yield start, np.ascontiguousarray(vectors[start:start + rows], dtype=np.float32)


class NpyRows:
    """A 2-d ``.npy`` file as rows: ``len``, ``shape``, ``x[a:b]`` and ``x[index_array]`` return
    new arrays read from the file (never mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran or len(self.shape) != 2:
            raise FormatError(f"{self.path}: expected a C-ordered 2-d array, found shape {self.shape}")
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("NpyRows: only contiguous slices")
            return self._read(start, max(stop, start))
        return self._take(np.asarray(key, dtype=np.int64))

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise FormatError(f"{self.path}: truncated (rows {start}:{stop} of {len(self)})")
        return out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row out of range 0..{len(self) - 1}")
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            for i, row in enumerate(rows.tolist()):
                f.seek(self.offset + row * self.row_bytes)
                f.readinto(memoryview(out[i]).cast("B"))
        return out


class NpyWriter:
    """Write a ``.npy`` of a known shape block by block (the bytes ``np.save`` writes)."""

    def __init__(self, path: str | Path, shape: tuple[int, int], dtype):
        self.path, self.shape, self.dtype, self.rows = Path(path), shape, np.dtype(dtype), 0
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})

    def write(self, block: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B"))
        self.rows += len(block)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise FormatError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")


def scan_split(split: EmbeddedFolder, eval_index=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(success ids, largest cosine of each success image with the evaluation images or None):
    every shard read and validated (both modalities), the ids checked unique across shards."""
    ids, best = [], []
    for path in split.shards:                 # one modality at a time: half the shard in memory
        part = read_shard(path, split.dim, modalities=("image",))
        ids.append(part["id"])
        if eval_index is not None:
            best.append(best_similarity(normalise_(part["image"]), eval_index))
        del part
        read_shard(path, split.dim, modalities=("text",))     # bad text vectors: an error now
    check_unique(np.concatenate(ids), [len(i) for i in ids], split)
    release_arrow_memory()
    return np.concatenate(ids), (np.concatenate(best) if eval_index is not None else None)


def stage(split: EmbeddedFolder, column: str, keep: np.ndarray, ids: np.ndarray,
          f32_path: Path, f16_path: Path) -> int:
    """Write the kept rows of ``column`` ("image"/"text"), L2-normalised, as float32 to
    ``f32_path`` and float16 to ``f16_path``; returns the rows written. ``keep`` and ``ids`` are
    per success row, in manifest order (:func:`scan_split`)."""
    shape = (int(keep.sum()), split.dim)
    start = 0
    with NpyWriter(f32_path, shape, np.float32) as w32, NpyWriter(f16_path, shape, np.float16) as w16:
        for path in split.shards:
            part = read_shard(path, split.dim, modalities=(column,))
            stop = start + len(part["id"])
            if not np.array_equal(part["id"], ids[start:stop]):
                raise FormatError(f"{path}: changed while build-index read it (other success ids); "
                                  f"rerun build-index")
            block, kept = part.pop(column), keep[start:stop]
            block = normalise_(block if kept.all() else block[kept])
            w32.write(block)
            for i in range(0, len(block), 4096):
                w16.write(block[i:i + 4096].astype(np.float16))
            start = stop
    release_arrow_memory()
    return shape[0]


# ---------------------------------------------------------------------------------------------
# faiss over row batches
# ---------------------------------------------------------------------------------------------

def _flat_codes(index: faiss.Index):
    """The IndexFlatCodes that stores whole vectors in ``index`` (itself, or the refine stage of
    an IndexRefine), or None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.refine_index)
    return index if isinstance(index, faiss.IndexFlatCodes) else None


def reserve_codes(index: faiss.Index, n: int) -> None:
    """Allocate once the codes of ``n`` more vectors in ``index``'s flat storage: grown batch by
    batch, its vector would be reallocated (old and new buffers both resident) each time it
    doubles. (Resized up then back: a std::vector keeps its capacity.)"""
    flat = _flat_codes(index)
    if flat is not None and n > 0:
        flat.codes.resize((flat.ntotal + n) * flat.code_size)
        flat.codes.resize(flat.ntotal * flat.code_size)


def add_in_batches(index: faiss.Index, vectors) -> faiss.Index:
    """Add ``vectors`` (array or :class:`NpyRows`) to a trained ``index``, one batch at a time."""
    reserve_codes(index, len(vectors))
    for _, block in row_batches(vectors):
        index.add(block)
    return index


def exact_knn(vectors, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner products, positions) of the ``k`` largest inner products of each query with
    ``vectors`` (array or :class:`NpyRows`), searched one batch at a time; -1 where k > n."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for start, block in row_batches(vectors):
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))
    heap.finalize()
    return heap.D, heap.I
