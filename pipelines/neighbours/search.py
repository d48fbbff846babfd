"""The neighbour pass's faiss/numpy core: search with exclusion of near-duplicates, then fetch.

For a training pair (v, t) and a search such as "v_img" (the image query against the image
index), the k nearest memory items are kept after EXCLUDING every memory item that is a
near-duplicate of the pair. What must never reach the trainer is the pair itself: if the memory
holds a copy of the pair's picture, the image search returns it and the fused context carries the
pair's own caption, which the text head can copy instead of learning. So an item is a duplicate
of the pair when, in any modality of ``dedup_on``, its embedding has cosine >=
``threshold`` with the pair's embedding of that modality (exact cosines: unit vectors, see
``Memory.unit_vectors``): "img" compares the pair's IMAGE with
the memory image (for every search, also the text searches, whose hits would otherwise hand back
the pair's own image), "txt" the pair's caption with the memory caption. The query itself, if it
is in the memory, is caught the same way (cosine 1).

``k + margin`` hits are searched and filtered; rows left with fewer than k because of exclusions
are searched again with a larger margin, and whatever is still missing is filled with -1.

Everything works on whole blocks of queries: one faiss search call per block and search (faiss
parallelises over the queries with its OpenMP threads), vectorised numpy exclusion and fetch
(bounded temporaries: ``CHUNK`` rows at a time), no per-row Python.
"""
from __future__ import annotations

import numpy as np

from reco.formats import parse_field
from reco.index.memory import Memory

QUERY_MODALITY = {"v": "img", "t": "txt"}
CHUNK = 2048        # rows per temporary (q, n_hits, d) float32 gather of the exclusion test


def split_search(search: str) -> tuple[str, str]:
    """"v_img" -> ("v", "img")."""
    query, index = search.split("_")
    return query, index


def duplicate_mask(memory: Memory, positions: np.ndarray, scores: np.ndarray, search: str,
                   pair: dict[str, np.ndarray], threshold: float, dedup_on: tuple[str, ...]) -> np.ndarray:
    """(q, n_hits) True where the hit is a near-duplicate of the pair (see module docstring)."""
    query, index = split_search(search)
    dup = np.zeros(positions.shape, dtype=bool)
    for modality in dedup_on:
        if QUERY_MODALITY[query] == modality == index:
            dup |= scores >= threshold             # the search already compared these
            continue
        ref = np.asarray(pair[modality], dtype=np.float32)
        for start in range(0, len(positions), CHUNK):
            sl = slice(start, start + CHUNK)
            hits = memory.unit_vectors(modality, positions[sl])            # (c, n_hits, d)
            dup[sl] |= np.matmul(hits, ref[sl, :, None])[..., 0] >= threshold
    return dup & (positions >= 0)


def _compact(scores: np.ndarray, positions: np.ndarray, keep: np.ndarray, k: int):
    """First k kept hits of each row (best first), -1/-inf after."""
    if keep.shape[1] < k:
        pad = k - keep.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
        keep = np.pad(keep, ((0, 0), (0, pad)), constant_values=False)
    sc = np.ascontiguousarray(scores[:, :k], dtype=np.float32)
    pos = np.ascontiguousarray(positions[:, :k], dtype=np.int64)
    bad = np.flatnonzero(~keep[:, :k].all(1))   # the common row keeps its first k hits as they are
    if len(bad):
        order = np.argsort(~keep[bad], axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep[bad], order, 1)
        pos[bad] = np.where(kept, np.take_along_axis(positions[bad], order, 1), -1)
        sc[bad] = np.where(kept, np.take_along_axis(scores[bad], order, 1), -np.inf)
    return sc, pos


def search_excluding(memory: Memory, pair: dict[str, np.ndarray], search: str, k: int, *,
                     threshold: float, dedup_on: tuple[str, ...] = ("img",), margin: int = 16):
    """k nearest memory items for one search of a block of pairs, duplicates excluded.

    Args:
        memory: loaded memory (with indices).
        pair: {"img": (q, d) image embeddings, "txt": (q, d) text embeddings}, unit norm.
        search: "v_img", "t_txt", "v_txt" or "t_img".
        k: neighbours kept.
        threshold: cosine at or above which a memory item is a duplicate of the pair.
        dedup_on: modalities compared (see module docstring).
        margin: extra hits searched so that k remain after exclusion.

    Returns (scores (q, k) float32, positions (q, k) int64, info {"n_excluded", "n_missing"}).
    """
    query, index = split_search(search)
    queries = np.ascontiguousarray(pair[QUERY_MODALITY[query]], dtype=np.float32)
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_p = np.full((len(queries), k), -1, dtype=np.int64)
    rows, n_hits, excluded = None, min(k + margin, memory.n), 0       # None: the whole block
    while rows is None or len(rows):
        sub = pair if rows is None else {m: v[rows] for m, v in pair.items()}
        scores, positions = memory.search(queries if rows is None else queries[rows], index, n_hits)
        dup = duplicate_mask(memory, positions, scores, search, sub, threshold, dedup_on)
        keep = (positions >= 0) & ~dup
        target = slice(None) if rows is None else rows
        out_s[target], out_p[target] = _compact(scores, positions, keep, k)
        # more hits help only where exclusions made the row short and the index had more to give
        short = (keep.sum(1) < k) & (positions >= 0).all(1)
        if n_hits >= memory.n or not short.any():
            excluded += int(dup.sum())
            break
        excluded += int(dup[~short].sum())
        rows = np.flatnonzero(short) if rows is None else rows[short]
        n_hits = min(n_hits * 4, memory.n)
    return out_s, out_p, {"n_excluded": excluded, "n_missing": int((out_p < 0).sum())}


def neighbour_batch(memory: Memory, pair: dict[str, np.ndarray], searches: list[str], k: int, **kwargs):
    """Every search of a block: {search: (scores, positions)} and summed info."""
    results, info = {}, {"n_excluded": 0, "n_missing": 0}
    for search in searches:
        scores, positions, i = search_excluding(memory, pair, search, k, **kwargs)
        results[search] = (scores, positions)
        for key in info:
            info[key] += i[key]
    return results, info


def materialise(memory: Memory, results: dict[str, tuple[np.ndarray, np.ndarray]],
                fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{field: (q, k, d) float16}: the memory embeddings of the fused modality of each hit
    (gathered straight from the float16 memory, no conversion; zero rows where -1)."""
    out = {}
    for field in fields:
        query, index, fuse = parse_field(field)
        _, positions = results[f"{query}_{index}"]
        out[field] = memory.embeddings(fuse, positions, dtype=np.float16)
    return out
