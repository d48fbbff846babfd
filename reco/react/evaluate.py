"""Zero-shot evaluation of REACT against the frozen CLIP, with RECO's evaluation functions.

The text tower is locked, so both models share the class embeddings (templates x class names,
averaged: :func:`reco.evaluation.zeroshot.encode_prompts` / ``class_embeddings``). Only the image
embeddings differ, and REACT's change with the image tower, so the evaluation images are decoded
from pixels (the world's files) rather than taken from the embedded shards. Metrics come from
:func:`reco.evaluation.zeroshot.zeroshot_metrics`, overall and per seen/unseen species group.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reco.config import RecoConfig
from reco.errors import FormatError
from reco.formats import atomic_write_text, read_parquet

EVAL_FILE = "eval.json"


@torch.no_grad()
def image_embeddings(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """L2-normalised ``model.encode_image`` of a pixel tensor, in batches -> (n, d) float32."""
    model.eval()
    out = [F.normalize(model.encode_image(pixels[i:i + batch_size]).float(), dim=-1)
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def labelled_split(cfg: RecoConfig, split: str = "test"):
    """The URL list of a labelled world split (url, label)."""
    table = read_parquet(cfg.paths.urls(split), required=["url", "label"])
    if table.num_rows == 0:
        raise FormatError(f"{cfg.paths.urls(split)}: no rows")
    return table


def compare_zeroshot(models: dict[str, torch.nn.Module], pixels: torch.Tensor, labels: np.ndarray,
                     class_emb: np.ndarray, groups: dict[str, np.ndarray] | None = None,
                     batch_size: int = 256) -> dict[str, dict]:
    """name -> zero-shot metrics (``all`` + groups) of each model on the same images/classes."""
    from reco.evaluation.zeroshot import zeroshot_metrics

    return {name: zeroshot_metrics(image_embeddings(m, pixels, batch_size), labels, class_emb, groups)
            for name, m in models.items()}


def evaluate_react(cfg: RecoConfig, model_dir: str | Path | None = None, *, clip=None,
                   react_model: torch.nn.Module | None = None, split: str = "test",
                   templates: Sequence[str] | None = None, image_source: str,
                   write: bool = True) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of the frozen CLIP and of REACT on a labelled world split.

    Args:
        model_dir: REACT output folder (loaded when ``react_model`` is not given; results are
            written there as ``eval.json``).
        clip: the frozen base CLIP (``LoadedClip``; default: the pipeline's).
        react_model: an in-memory customised model (e.g. right after training).
        split: world split with labels (``test``).
        templates: prompt templates (default ``cfg.eval.templates``).
        image_source: where pixels come from (:mod:`reco.react.images`: ``webdataset`` for a
            download, ``world``/``embedded``); no default: the world is one source among others.
    Returns ``{"frozen": {"all"|"seen"|"unseen": metrics}, "react": {...}, "delta_top1": {...}}``.
    """
    from reco.evaluation.data import read_classnames, read_groups
    from reco.evaluation.zeroshot import class_embeddings, encode_prompts
    from reco.react.images import load_pixels
    from reco.react.retrieve import load_frozen_clip

    clip = clip or load_frozen_clip(cfg)
    if react_model is None:
        from reco.react.model import ReactModel

        react_model = ReactModel.load(model_dir, clip=clip).model
    classnames = read_classnames(cfg.paths.world / "classnames.txt")
    groups = read_groups(cfg.paths.world)
    rows = labelled_split(cfg, split)
    labels = rows.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    if labels.max() >= len(classnames):
        raise FormatError(f"{cfg.paths.urls(split)}: label {labels.max()} beyond the "
                          f"{len(classnames)} class names")
    pixels = load_pixels(cfg, rows, clip.preprocess, source=image_source)
    class_emb = class_embeddings(encode_prompts(clip, classnames, tuple(templates or cfg.eval.templates)))
    results = compare_zeroshot({"frozen": clip.model, "react": react_model}, pixels, labels,
                               class_emb, groups, cfg.eval.batch_size)
    results["delta_top1"] = {g: results["react"][g]["top1"] - results["frozen"][g]["top1"]
                             for g in results["frozen"]}
    results["split"], results["n_images"] = split, int(len(labels))
    if write and model_dir is not None:
        atomic_write_text(Path(model_dir) / EVAL_FILE, json.dumps(results, indent=2))
    return results
