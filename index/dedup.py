"""Memory cleaning: drop memory items whose image is a near-duplicate of an evaluation image.

Web-scale memories contain copies of benchmark images; retrieving one at test time hands the
model the answer. Each memory image is compared (cosine, exact search) with every evaluation
image; items at or above ``threshold`` are removed before the index is built. The threshold is
chosen so that copies (cosine ~1 up to fp16 rounding and re-encoding) are caught while ordinary
images of the same species are kept: see ``NeighboursConfig.eval_dedup_threshold``.
"""
from __future__ import annotations

import faiss
import numpy as np


def reference_index(reference: np.ndarray) -> faiss.IndexFlatIP:
    """Exact inner-product index over the (m, d) ``reference`` rows."""
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    return index


def best_similarity(queries: np.ndarray, index: faiss.Index, batch_size: int = 65536) -> np.ndarray:
    """For each row of ``queries`` its largest inner product with any vector of ``index``
    (-inf when the index is empty)."""
    out = np.full(len(queries), -np.inf, dtype=np.float32)
    if index.ntotal == 0:
        return out
    for start in range(0, len(queries), batch_size):
        block = np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32)
        out[start:start + len(block)] = index.search(block, 1)[0][:, 0]
    return out


def max_similarity(queries: np.ndarray, reference: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """For each row of ``queries`` its largest inner product with any row of ``reference``."""
    if len(reference) == 0 or len(queries) == 0:
        return np.full(len(queries), -np.inf, dtype=np.float32)
    return best_similarity(queries, reference_index(reference), batch_size)


def eval_duplicate_mask(memory_image: np.ndarray, eval_image: np.ndarray | None,
                        threshold: float) -> tuple[np.ndarray, dict]:
    """Boolean mask of memory items to REMOVE, and info (counts, similarity quantiles).

    Args:
        memory_image: (n, d) L2-normalised memory image embeddings.
        eval_image: (m, d) L2-normalised evaluation image embeddings, or None (nothing removed).
        threshold: cosine at or above which a memory image counts as a copy.
    """
    if eval_image is None or len(eval_image) == 0:
        return duplicate_mask(None, len(memory_image), threshold, 0)
    return duplicate_mask(max_similarity(memory_image, eval_image), len(memory_image), threshold,
                          len(eval_image))


def duplicate_mask(best: np.ndarray | None, n: int, threshold: float, eval_images: int
                   ) -> tuple[np.ndarray, dict]:
    """:func:`eval_duplicate_mask` from each memory image's largest cosine with the
    ``eval_images`` evaluation images (``best``; None or no evaluation images: nothing removed)."""
    if best is None or eval_images == 0:
        return np.zeros(n, dtype=bool), {"n_removed_eval_duplicates": 0, "eval_images": 0}
    mask = best >= threshold
    qs = np.quantile(best, [0.5, 0.9, 0.99, 0.999]).round(6).tolist() if n else []
    info = {"n_removed_eval_duplicates": int(mask.sum()), "eval_images": int(eval_images),
            "eval_dedup_threshold": float(threshold),
            "max_sim_to_eval_quantiles": dict(zip(["p50", "p90", "p99", "p999"], qs))}
    return mask, info
