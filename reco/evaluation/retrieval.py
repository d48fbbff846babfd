"""Image <-> text retrieval recall@K over paired embeddings.

Pair i is (image i, text i). Identical captions embed identically, so a text whose caption equals
the image's own caption counts as a correct answer too (and likewise for text -> image); without
captions only the diagonal is correct.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def positives_from_captions(captions: Sequence[str] | None, n: int) -> np.ndarray:
    """(n, n) bool: pair j answers query i (same caption, or i == j)."""
    if captions is None:
        return np.eye(n, dtype=bool)
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} pairs")
    _, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    return inverse[:, None] == inverse[None, :]


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Percent of queries (rows of ``scores``) with a positive among their top-k columns."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(positives, order, axis=1)
    first = np.where(ranked.any(axis=1), ranked.argmax(axis=1), np.iinfo(np.int64).max)
    return {f"R@{k}": 100.0 * float((first < k).mean()) for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray,
                      captions: Sequence[str] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """``{"image_to_text": {"R@1": ..}, "text_to_image": {...}}`` in percent."""
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {image_emb.shape} and text {text_emb.shape} embeddings differ")
    pos = positives_from_captions(captions, len(image_emb))
    scores = image_emb @ text_emb.T
    return {"image_to_text": recall_at_k(scores, pos, ks),
            "text_to_image": recall_at_k(scores.T, pos.T, ks)}


def evaluate_retrieval(model, image_emb: np.ndarray, text_emb: np.ndarray,
                       captions: Sequence[str] | None = None,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Retrieval metrics of a :class:`reco.model.RecoModel` in its current mode on precomputed
    plain CLIP embeddings of the pairs."""
    return retrieval_metrics(model.refine("image", image_emb), model.refine("text", text_emb),
                             captions, ks)
