"""Zero-shot classification: top-1, top-5 and mean per-class recall, overall and per label group
(seen / unseen species), on embedded shards or on an ImageFolder-layout folder of images.

Class embeddings follow CLIP: each prompt (template x class name) is embedded, refined by the
text fusion head when the mode turns the text side on, averaged over templates and normalised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from reco.evaluation.data import image_folder_labels


def format_prompt(template: str, name: str) -> str:
    """``"a photo of a {}."`` or clip_benchmark's ``"a photo of a {c}."`` with the class name."""
    return template.replace("{c}", name) if "{c}" in template else template.format(name)


@torch.no_grad()
def encode_prompts(clip, classnames: Sequence[str], templates: Sequence[str],
                   batch_size: int = 256) -> np.ndarray:
    """Plain CLIP embeddings (C, T, d) (L2-normalised) of every template x class name."""
    from reco.clip import encode_texts

    prompts = [format_prompt(t, c) for c in classnames for t in templates]
    out = [encode_texts(clip, prompts[i:i + batch_size]).numpy()
           for i in range(0, len(prompts), batch_size)]
    emb = np.concatenate(out).astype(np.float32)
    return emb.reshape(len(classnames), len(templates), -1)


def class_embeddings(prompt_emb: np.ndarray, refine=None) -> np.ndarray:
    """(C, d) class weights: prompts refined by ``refine`` ((n,d) -> (n,d)), then averaged over
    templates and normalised."""
    c, t, d = prompt_emb.shape
    flat = prompt_emb.reshape(c * t, d)
    if refine is not None:
        flat = np.asarray(refine(flat), dtype=np.float32)
    flat = _normalize(flat)
    return _normalize(flat.reshape(c, t, d).mean(axis=1))


@torch.no_grad()
def encode_image_files(clip, files: Sequence[Path], batch_size: int = 256) -> np.ndarray:
    """Plain CLIP image embeddings (n, d), L2-normalised, of image files (eval preprocess)."""
    from PIL import Image

    from reco.clip import encode_images

    out = []
    for i in range(0, len(files), batch_size):
        pixels = []
        for f in files[i:i + batch_size]:
            with Image.open(f) as im:
                pixels.append(clip.preprocess(im.convert("RGB")))
        out.append(encode_images(clip, torch.stack(pixels)).numpy())
    return np.concatenate(out).astype(np.float32)


def zeroshot_metrics(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                     groups: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Metrics (in percent) of classifying ``image_emb`` among all classes of ``class_emb``.

    Args:
        image_emb: (n, d) image embeddings; labels: (n,) class ids (rows with -1 are skipped).
        class_emb: (C, d) class weights.
        groups: optional ``{"seen": label ids, "unseen": ...}``: metrics also over the images
            whose label is in each group, predicted among all C classes (``<group>``, the
            generalised zero-shot protocol) and among the group's classes only
            (``<group>_among_<group>``, the group as a data set of its own).
    Returns ``{"all": {...}, "<group>": {...}, ...}`` each with top1, top5,
    mean_per_class_recall, n.
    """
    keep = labels >= 0
    scores = np.asarray(image_emb, np.float32)[keep] @ np.asarray(class_emb, np.float32).T
    labels = labels[keep]
    result = {"all": _metrics(scores, labels)}
    for name, ids in (groups or {}).items():
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[ids < scores.shape[1]]
        mask = np.isin(labels, ids)
        result[name] = _metrics(scores[mask], labels[mask])
        # the group as a data set of its own: its images among its classes only
        result[f"{name}_among_{name}"] = _metrics(scores[mask][:, ids], np.searchsorted(ids, labels[mask]))
    return result


def _metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    n = len(labels)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_per_class_recall": float("nan"), "n": 0}
    kk = min(5, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(axis=1)
    recalls = [hit1[labels == c].mean() for c in np.unique(labels)]
    return {"top1": 100.0 * float(hit1.mean()), "top5": 100.0 * float(hit5.mean()),
            "mean_per_class_recall": 100.0 * float(np.mean(recalls)), "n": int(n)}


def evaluate_zeroshot(model, image_emb: np.ndarray, labels: np.ndarray, prompt_emb: np.ndarray,
                      groups: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Zero-shot metrics of a :class:`reco.model.RecoModel` in its current mode, on precomputed
    plain CLIP image embeddings and prompt embeddings (:func:`encode_prompts`)."""
    cls = class_embeddings(prompt_emb, refine=lambda x: model.refine("text", x))
    img = _normalize(np.asarray(model.refine("image", image_emb), np.float32))
    return zeroshot_metrics(img, labels, cls, groups)


def image_folder_inputs(clip, folder: str | Path, classnames: list[str] | None,
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(image embeddings, labels, class names) of an ImageFolder-layout folder."""
    files, labels, names = image_folder_labels(folder, classnames)
    return encode_image_files(clip, files, batch_size), labels, names


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
