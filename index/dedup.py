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


def max_similarity(queries: np.ndarray, reference: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """For each row of ``queries`` its largest inner product with any row of ``reference``."""
    if len(reference) == 0 or len(queries) == 0:
        return np.full(len(queries), -np.inf, dtype=np.float32)
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), batch_size):
        block = np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32)
        out[start:start + len(block)] = index.search(block, 1)[0][:, 0]
    return out


def eval_duplicate_mask(memory_image: np.ndarray, eval_image: np.ndarray | None,
                        threshold: float) -> tuple[np.ndarray, dict]:
    """Boolean mask of memory items to REMOVE, and info (counts, similarity quantiles).

    Args:
        memory_image: (n, d) L2-normalised memory image embeddings.
        eval_image: (m, d) L2-normalised evaluation image embeddings, or None (nothing removed).
        threshold: cosine at or above which a memory image counts as a copy.
    """
    n = len(memory_image)
    if eval_image is None or len(eval_image) == 0:
        return np.zeros(n, dtype=bool), {"n_removed_eval_duplicates": 0, "eval_images": 0}
    best = max_similarity(memory_image, eval_image)
    mask = best >= threshold
    qs = np.quantile(best, [0.5, 0.9, 0.99, 0.999]).round(6).tolist() if n else []
    info = {"n_removed_eval_duplicates": int(mask.sum()), "eval_images": int(len(eval_image)),
            "eval_dedup_threshold": float(threshold),
            "max_sim_to_eval_quantiles": dict(zip(["p50", "p90", "p99", "p999"], qs))}
    return mask, info
