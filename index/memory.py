"""The memory index folder as one object: ids, fp16 embeddings and one faiss index per modality.

Folder layout (written by :func:`reco.index.build.build_memory_index`)::

    image.index  text.index          faiss indices over the memory image / text embeddings
    memory_image.npy memory_text.npy (n, d) float16, row i = faiss label i of both indices
    memory_ids.npy                   (n,) int64 ids of the embedded memory rows
    info.json                        model_id, dim, n, per-index key/metric/nprobe/recall, ...

Scores are always inner products of L2-normalised vectors, whatever metric the index uses
internally (IVF-PQ indices are built with L2, see ``reco.index.keys``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from reco.errors import ConfigError, FormatError, MismatchError
from reco.formats import parse_field, to_float32
from reco.validate import INDEX_INFO_KEYS, load_npy, read_json

log = logging.getLogger(__name__)

INDEX_FILES = {"img": "image.index", "txt": "text.index"}
EMB_FILES = {"img": "memory_image.npy", "txt": "memory_text.npy"}
IDS_FILE = "memory_ids.npy"
INFO_FILE = "info.json"


def read_index(path: str, mmap: bool = False) -> faiss.Index:
    """faiss.read_index, memory-mapped when asked and supported by the index type; a truncated
    or corrupt file is a FormatError naming it (faiss raises RuntimeError)."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: index file not found; run `reco build-index` first")
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:   # not every index type can be mapped
            log.debug("%s cannot be memory-mapped (%s); reading it into memory", path, str(exc)[:80])
    try:
        return faiss.read_index(path)
    except (RuntimeError, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: not a readable faiss index ({reason}); rebuild it with "
                          f"`reco build-index --force`") from exc


def set_search_params(index: faiss.Index, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Set nprobe (IVF indices) and the refine shortlist factor (IndexRefine) when relevant."""
    if k_factor is not None and isinstance(index, faiss.IndexRefine):
        index.k_factor = float(k_factor)
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:
            pass                          # not an IVF index (Flat): nothing to set


def gpus_for(use_gpu: bool, option: str = "index.use_gpu") -> int:
    """GPUs faiss sees when ``use_gpu`` (0 when not asked); asked with none: a loud warning (the
    work runs on the CPU)."""
    if not use_gpu:
        return 0
    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if count == 0:
        log.warning("%s=true but faiss sees no GPU (faiss-cpu installed, or no CUDA device; "
                    "pip install '.[gpu]' on a GPU machine): running on the CPU", option)
    return count


def to_gpu(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """Move an index to all GPUs when asked. Asked with no GPU visible to faiss: a loud warning,
    the CPU searches; an index type faiss-gpu cannot hold (fast-scan PQ, refine stages): a
    ConfigError naming it (never a silent CPU search)."""
    if not gpus_for(use_gpu):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"index.use_gpu=true: this {type(faiss.downcast_index(index)).__name__} cannot "
                          f"move to the GPU ({first[:160]}); rebuild it with GPU keys (IVF...,Flat/SQfp16/SQ8) "
                          f"on a GPU machine: reco build-index --force --set index.use_gpu=true; or set "
                          f"index.use_gpu=false to search on the CPU") from None


def _flat_vectors(index: faiss.Index | None, n: int, dim: int) -> np.ndarray | None:
    """Zero-copy (n, dim) float32 view of an IndexFlat's vectors (also the refine stage of an
    IndexRefine); None for any other index."""
    try:
        if isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.refine_index)
        if not isinstance(index, faiss.IndexFlat) or index.ntotal != n or index.d != dim:
            return None
        return faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)
    except (AttributeError, RuntimeError, TypeError):
        return None


def _load_npy(path: Path, mmap: bool, dtype, ndim: int) -> np.ndarray:
    """A validated array of the folder (FormatError naming the file: missing, corrupt, pickled
    objects, wrong dtype or shape)."""
    if not path.exists():
        raise FormatError(f"{path}: not found; run `reco build-index` first")
    return load_npy(path, dtype=dtype, ndim=ndim, mmap=mmap)


def read_info(folder: str | Path) -> dict:
    """The folder's ``info.json``, validated: the keys the memory needs, typed (FormatError
    naming the file otherwise)."""
    path = Path(folder) / INFO_FILE
    if not path.exists():
        raise FormatError(f"{path}: not found; run `reco build-index` first")
    info = read_json(path, INDEX_INFO_KEYS)
    indices = info.get("indices", {})
    if not isinstance(indices, dict) or not all(isinstance(v, dict) for v in indices.values()):
        raise FormatError(f"{path}: key 'indices' is {indices!r}, expected an object per modality")
    for m, meta in indices.items():
        for key, typ in (("nprobe", int), ("k_factor", (int, float))):
            value = meta.get(key)
            if value is not None and (not isinstance(value, typ) or isinstance(value, bool) or value <= 0):
                raise FormatError(f"{path}: indices.{m}.{key} is {value!r}, expected a positive number")
    return info


class Memory:
    """Search the memory and fetch the embeddings of the hits (see the module docstring)."""

    def __init__(self, ids: np.ndarray, image_emb: np.ndarray, text_emb: np.ndarray, info: dict,
                 indices: dict[str, faiss.Index] | None = None):
        self.ids, self.image_emb, self.text_emb, self.info = ids, image_emb, text_emb, info
        self.indices = indices or {}
        self.digest = ""                                         # the index record's (Memory.load)
        self.folder: str | None = None                           # where it was loaded from
        self._vectors: dict[str, np.ndarray | None] = {}        # see _index_vectors
        self.dim = int(info["dim"])
        self.model_id = str(info.get("model_id", ""))
        if not (len(ids) == len(image_emb) == len(text_emb)):
            raise FormatError(f"memory arrays are not aligned: {len(ids)} ids, {len(image_emb)} "
                              f"image rows, {len(text_emb)} text rows")

    @property
    def n(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False, nprobe: int | None = None,
             load_indices: bool = True, use_gpu: bool = False, verify: bool = True) -> "Memory":
        """Load an index folder.

        Args:
            folder: the folder written by build-index.
            mmap: memory-map the npy arrays (and the indices where faiss supports it).
            nprobe: override the tuned nprobe recorded in info.json.
            load_indices: False loads only ids/embeddings (for fetching, not searching).
            use_gpu: move the indices to the GPUs if faiss has any.
            verify: check every file against the folder's run record (``record.json``: a file
                replaced after build-index wrote it is a FormatError); its digest is then
                ``memory.digest`` (what downstream records name the index by).
        """
        from reco.record import input_digest

        folder = Path(folder)
        digest = input_digest(folder, "index", command="build-index", verify=verify)
        info = read_info(folder)
        arrays = {m: _load_npy(folder / f, mmap, np.float16, 2) for m, f in EMB_FILES.items()}
        ids = _load_npy(folder / IDS_FILE, mmap, np.int64, 1)
        for m, f in EMB_FILES.items():
            if arrays[m].shape[1] != info["dim"]:
                raise FormatError(f"{folder / f}: vectors of dimension {arrays[m].shape[1]}, "
                                  f"{folder / INFO_FILE} says {info['dim']}")
        indices = {}
        if load_indices:
            for m, name in INDEX_FILES.items():
                index = read_index(str(folder / name), mmap)
                meta = info.get("indices", {}).get(m, {})
                set_search_params(index, nprobe or meta.get("nprobe"), meta.get("k_factor"))
                if index.ntotal != len(ids):
                    raise FormatError(f"{folder / name}: {index.ntotal} vectors but {len(ids)} ids")
                indices[m] = to_gpu(index, use_gpu)
        memory = cls(ids, arrays["img"], arrays["txt"], info, indices)
        memory.digest, memory.folder = digest or "", str(folder)
        return memory

    def check_compatible(self, model_id: str | None, dim: int) -> None:
        """Raise MismatchError unless queries of ``model_id``/``dim`` can search this memory."""
        if dim != self.dim:
            raise MismatchError(f"index dimension {self.dim} != query dimension {dim}: the index "
                                f"was built with model {self.model_id!r}")
        if model_id and self.model_id and model_id != self.model_id:
            raise MismatchError(f"index built with model {self.model_id!r}, queries from model "
                                f"{model_id!r}; rebuild the index (reco build-index) with the same model")

    def _emb(self, modality: str) -> np.ndarray:
        if modality not in EMB_FILES:
            raise ValueError(f"modality must be 'img' or 'txt', got {modality!r}")
        return self.image_emb if modality == "img" else self.text_emb

    def search(self, queries: np.ndarray, index: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest memory items of each query in the ``index`` ("img"|"txt") index.

        Returns (scores (q, k) float32 inner products, positions (q, k) int64); missing hits
        (k > n) have position -1 and score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MismatchError(f"index dimension {self.dim} != query dimension "
                                f"{queries.shape[-1] if queries.ndim else 0}")
        if index not in self.indices:
            raise ValueError(f"index must be one of {sorted(self.indices) or 'none (loaded without indices)'}, got {index!r}")
        faiss_index = self.indices[index]
        scores, positions = faiss_index.search(queries, int(k))
        if faiss_index.metric_type == faiss.METRIC_L2:   # |q-x|^2 = |q|^2 + 1 - 2<q,x>, |x| = 1
            sq = np.einsum("ij,ij->i", queries, queries)[:, None]
            scores = (sq + 1.0 - scores) / 2.0
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        return scores, positions.astype(np.int64)

    def embeddings(self, modality: str, positions: np.ndarray, dtype=np.float32,
                   sorted_reads: bool = False) -> np.ndarray:
        """(q, k) positions -> (q, k, d) memory embeddings, zero rows where -1.

        Args:
            dtype: float32 (default) or float16 (the stored values, no conversion).
            sorted_reads: read the rows in position order (then put them back in place); helps
                only a memory-mapped array that is not in the page cache: otherwise one
                ``np.take`` is ~4x faster than sort + gather + scatter.
        """
        positions = np.asarray(positions, dtype=np.int64)
        emb = np.asarray(self._emb(modality))          # a memmap's ndarray view: plain np.take
        flat = positions.reshape(-1)
        valid = flat >= 0
        idx = np.where(valid, flat, 0)
        if sorted_reads:
            order = np.argsort(idx)
            rows = np.empty((flat.size, self.dim), dtype=emb.dtype)
            rows[order] = np.take(emb, idx[order], axis=0)
        else:
            rows = np.take(emb, idx, axis=0)
        out = to_float32(rows) if np.dtype(dtype) == np.float32 else rows.astype(dtype, copy=False)
        if not valid.all():
            out[~valid] = 0
        return out.reshape(*positions.shape, self.dim)

    def unit_vectors(self, modality: str, positions: np.ndarray) -> np.ndarray:
        """(q, k) positions -> (q, k, d) float32 unit vectors of the memory items (zero where -1),
        for exact cosines: read from the float32 vectors an exact index keeps (Flat, or the
        refine stage of IVF-PQ+RFlat), else the stored float16 embeddings."""
        vectors = self._index_vectors(modality)
        if vectors is None:
            return self.embeddings(modality, positions)
        positions = np.asarray(positions, dtype=np.int64)
        out = np.take(vectors, np.maximum(positions, 0).reshape(-1), axis=0)
        out[positions.reshape(-1) < 0] = 0
        return out.reshape(*positions.shape, self.dim)

    def _index_vectors(self, modality: str) -> np.ndarray | None:
        """(n, d) float32 view of the vectors stored in the ``modality`` index, if it keeps
        them uncompressed (IndexFlat, IndexRefineFlat); None otherwise (or without indices)."""
        if modality not in self._vectors:
            self._vectors[modality] = _flat_vectors(self.indices.get(modality), self.n, self.dim)
        return self._vectors[modality]

    def context(self, queries: np.ndarray, field: str, k: int) -> np.ndarray:
        """Search then fetch for a context field like "v_img_txt" -> (q, k, d) float32."""
        _, search, fuse = parse_field(field)
        _, positions = self.search(queries, search, k)
        return self.embeddings(fuse, positions)
