"""Model selection of the ablation variants on held-out *validation species*.

The zero-shot protocol of Xian et al. (2018, "Zero-shot learning: the good, the bad and the
ugly"): training, validation and test classes are disjoint, and every choice made during
training (here: when to stop) is made on the validation classes, never on the test classes.

A fraction of the *seen* species (``ablation_val_fraction``) is held out: their pairs are
removed from the RECO training tensors, and their training-split images, classified among the
validation species' names, become the validation set. Every variant saves checkpoints at
``ablation_val_checkpoints`` evenly spaced steps; of those (step 0, the untrained head = the
frozen CLIP, included) the earliest whose validation top-1 is within one standard error of the
best becomes the variant's heads (:func:`pick_step`: a head must beat the frozen CLIP by more
than the validation set's noise). The unseen test species play no part in it.

Why: the generated world's RECO training set holds few species (56 seen in the tiny preset,
against millions of concepts in CC12M), so heads can memorise the seen species' names from the
query alone; how fast that drifts the embeddings of other species away depends on the world seed
(with the earlier 40-species tiny world, an MLP head lost 28 points on the unseen species of
world seed 1 after 100 steps, 2 on seed 0). Validation species measure exactly that
drift, for every variant alike.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow as pa

from experiments.chain import link
from reco.errors import ConfigError
from reco.formats import Manifest, atomic_write_table, atomic_write_text, read_parquet

log = logging.getLogger(__name__)
DONE = "validation.json"
METRIC = "val_among_val"
RULE = "one-standard-error, last step when saturated"   # recorded in heads.json: heads selected by another rule are redone


def validation_species(seen: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of ``round(fraction * len(seen))`` seen species held out for validation (at
    least 2 when ``fraction > 0``: a one-class validation set says nothing)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"ablation_val_fraction={fraction} (--ablation-val-fraction): must be in "
                          f"[0, 1)")
    seen = np.asarray(sorted(int(s) for s in seen), dtype=np.int64)
    n = 0 if fraction == 0 else max(2, int(round(fraction * len(seen))))
    if n >= len(seen):
        raise ConfigError(f"ablation_val_fraction={fraction} (--ablation-val-fraction): would hold "
                          f"out all {len(seen)} seen species")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 404]))
    return np.sort(rng.choice(seen, size=n, replace=False)) if n else seen[:0]


def filter_tensors(src: str | Path, dst: str | Path, drop_ids: np.ndarray) -> dict[str, int]:
    """Copy trainer tensor shards from ``src`` to ``dst`` without the rows whose ``id`` is in
    ``drop_ids`` (same shard names, schema and row-group layout rules, new manifest)."""
    manifest = Manifest.read(src, kind="tensors")
    drop = pa.array(np.asarray(drop_ids, dtype=np.int64))
    kept = total = 0
    counts = dict(manifest.counts)
    for name, path in zip(manifest.shards, manifest.shard_paths(src)):
        table = read_parquet(path, required=["id"])
        part = table.filter(pc.invert(pc.is_in(table["id"], value_set=drop)))
        if part.num_rows == 0:
            raise ConfigError(f"{path}: no training rows left after holding out the validation "
                              f"species; lower ablation_val_fraction (--ablation-val-fraction)")
        atomic_write_table(part, Path(dst) / name)
        kept, total = kept + part.num_rows, total + table.num_rows
        if name in counts:                       # the manifest's rows per shard, as written
            counts[name] = part.num_rows
    if "total" in counts:
        counts["total"] = kept
    Manifest(kind="tensors", shards=list(manifest.shards), counts={**counts, "rows": kept},
             info={**manifest.info, "held_out_rows": total - kept}).write(dst)
    return {"rows": kept, "of": total}



def prepare_validation(cfg, fraction: float, workdir: str | Path, *, seed: int | None = None
                       ) -> tuple[Any, dict[str, Any]]:
    """A side work directory whose neighbour tensors lack the validation species' pairs (world,
    embeddings and index linked from ``cfg``'s). Returns (its RecoConfig, info with
    ``val_species``); reused when already prepared from the same tensors."""
    from reco.evaluation.data import load_embedded, read_groups

    workdir = Path(workdir)
    seed = cfg.seed if seed is None else seed
    src = Path(cfg.paths.neighbours) / "tensors"
    groups = read_groups(cfg.paths.world)
    # a long-tail world's head and tail test species stay in training (they are tested as seen)
    tested = np.concatenate([groups.get(g, np.zeros(0, np.int64)) for g in ("head", "tail")])
    val = validation_species(np.setdiff1d(groups["seen"], tested), fraction, seed)
    source = Manifest.read(src, kind="tensors")
    key = {"fraction": fraction, "seed": seed, "source": str(src.resolve()), "filter": 2,
           "shards": source.shards, "counts": source.counts, "val_species": val.tolist()}
    side = dataclasses.replace(cfg, workdir=str(workdir))
    done = workdir / DONE
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return side, json.loads(done.read_text())
    for name in ("world", "embeddings", "index", "base_clip"):
        if getattr(cfg.paths, name).exists():
            link(getattr(cfg.paths, name), getattr(side.paths, name))
    train = load_embedded(cfg.paths.embedded("train"))
    rows = filter_tensors(src, Path(side.paths.neighbours) / "tensors",
                          train.ids[np.isin(train.labels, val)])
    info = {"key": key, "val_species": val.tolist(), "rows": rows,
            "val_images": int(np.isin(train.labels, val).sum())}
    atomic_write_text(done, json.dumps(info, indent=2))
    log.info("validation: %d species held out (%d images); %d of %d training rows kept",
             len(val), info["val_images"], rows["rows"], rows["of"])
    return side, info


def validation_inputs(cfg, clip, val_species, templates=None):
    """EvalInputs over the training-split images of the validation species, with the single
    group ``val`` (metric ``val_among_val``: among the validation species' names)."""
    from reco.evaluation.data import load_embedded, read_classnames
    from reco.evaluation.evaluate import EvalInputs
    from reco.evaluation.zeroshot import encode_prompts

    names = read_classnames(cfg.paths.world / "classnames.txt")
    train = load_embedded(cfg.paths.embedded("train"), model_id=clip.model_id)
    keep = np.isin(train.labels, val_species)
    split = dataclasses.replace(train, ids=train.ids[keep], image_emb=train.image_emb[keep],
                                text_emb=train.text_emb[keep], labels=train.labels[keep],
                                captions=[c for c, k in zip(train.captions, keep) if k],
                                urls=[u for u, k in zip(train.urls, keep) if k])
    prompts = encode_prompts(clip, names, templates or cfg.eval.templates, cfg.eval.batch_size)
    return EvalInputs(split, names, prompts, {"val": np.asarray(val_species, dtype=np.int64)})


def _heads_at(folder: Path | None, train_cfg, dim: int) -> dict:
    """The heads of a checkpoint folder, or the untrained heads (= frozen CLIP) for None."""
    from reco.trainer.checkpoint import load_checkpoint
    from reco.trainer.train import build_train_model

    model = build_train_model(train_cfg, dim)
    if folder is not None:
        model.load_state_dict(load_checkpoint(folder)[0])
    heads = dict(model.heads)
    for h in heads.values():
        h.eval()
    return heads


def pick_step(curve: dict[int, float], n: int) -> tuple[int, float]:
    """The one-standard-error rule (Hastie et al., *Elements of Statistical Learning*, 7.10):
    the earliest step whose validation top-1 (%) is within one standard error of the best, the
    error being that of a proportion measured on ``n`` images, ``100 * sqrt(p (1 - p) / n)`` at
    the best. Earlier = closer to the frozen CLIP: a checkpoint must beat step 0 by more than
    the noise of the validation set to be chosen. Returns (step, standard error)."""
    best = max(curve.values())
    p = best / 100.0
    se = 100.0 * float(np.sqrt(p * (1.0 - p) / max(1, n)))
    step = min(s for s, x in curve.items() if x >= best - se)
    return step, round(se, 3)


MIN_VAL_IMAGES = 30


def saturation(step0_top1: float, n: int) -> str | None:
    """Why a validation set of ``n`` images on which the frozen CLIP (step 0) scores
    ``step0_top1`` % cannot discriminate between checkpoints, or None when it can: fewer than
    :data:`MIN_VAL_IMAGES` images, or a headroom ``100 - step0_top1`` within one standard error
    (Agresti-Coull, never 0) of step 0's, so no checkpoint could beat step 0 by the one-standard-
    error rule's margin however good it were."""
    if n < MIN_VAL_IMAGES:
        return f"only {n} validation images (< {MIN_VAL_IMAGES})"
    p = (step0_top1 / 100.0 * n + 2.0) / (n + 4.0)
    se = 100.0 * float(np.sqrt(p * (1.0 - p) / n))
    if 100.0 - step0_top1 <= se:
        return (f"the frozen CLIP already scores {step0_top1:.1f}% on the {n} validation images "
                f"(headroom {100.0 - step0_top1:.1f} <= one standard error {se:.1f})")
    return None


def choose_step(curve: dict[int, float], n: int) -> tuple[int, float, str | None]:
    """:func:`pick_step`, unless the validation set cannot discriminate (:func:`saturation`):
    then the last step, with the reason (logged as a warning and written to the report), so
    that selection never silently turns every variant into the frozen CLIP. Returns (step,
    standard error, warning or None)."""
    step, se = pick_step(curve, n)
    why = saturation(curve[min(curve)], n)
    if why is None:
        return step, se, None
    warning = (f"model selection cannot discriminate: {why}; kept the last step {max(curve)} "
               f"instead of step {step}; hold out more or harder validation species "
               f"(ablation_val_fraction, --ablation-val-fraction)")
    log.warning(warning)
    return max(curve), se, warning


def select_checkpoint(heads_dir: str | Path, clip, memory, val_inputs) -> dict[str, Any]:
    """Evaluate step 0 and every checkpoint under ``heads_dir`` on the validation species; write
    the heads of the step :func:`pick_step` chooses as ``heads_dir``'s heads (``heads.json``
    gains ``selection``).

    Returns the selection info: ``curve`` ({step: val top-1}), ``step``, ``val_top1``,
    ``best_val_top1``, ``standard_error``.
    """
    import torch

    from reco.evaluation.zeroshot import evaluate_zeroshot
    from reco.model import RecoModel
    from reco.trainer import checkpoint as ckpt_lib

    heads_dir = Path(heads_dir)
    _, meta = ckpt_lib.load_heads(heads_dir)
    tc = _train_config(meta["train"])
    points = [(0, None)] + sorted((int(p.name.split("-")[1]), p)
                                  for p in (heads_dir / ckpt_lib.CHECKPOINTS).glob("step-*")
                                  if (p / "state.json").is_file())
    curve, heads_of = {}, {}
    t = val_inputs.test
    with torch.no_grad():
        for step, folder in points:
            heads_of[step] = _heads_at(folder, tc, int(meta["dim"]))
            model = RecoModel(clip, memory, heads_of[step], meta, mode="off")
            model.mode = "both" if "both" in model.available_modes() else model.available_modes()[-1]
            zs = evaluate_zeroshot(model, t.image_emb, t.labels, val_inputs.prompt_emb, val_inputs.groups)
            curve[step] = zs[METRIC]["top1"]
    step, se, warning = choose_step(curve, len(t))
    heads = heads_of[step]
    selection = {"step": step, "val_top1": curve[step], "best_val_top1": max(curve.values()),
                 "standard_error": se, "rule": RULE, "warning": warning,
                 "curve": {str(k): x for k, x in curve.items()},
                 "val_species": val_inputs.groups["val"].tolist(), "val_images": len(t)}
    ckpt_lib.save_heads(heads_dir, heads, {**{k: v for k, v in meta.items() if k != "sides"},
                                           "selection": selection})
    log.info("selected step %d (validation top-1 %.1f) of %s", step, curve[step], heads_dir)
    return selection


def _train_config(data: dict):
    from reco.config import from_dict
    from reco.trainer.config import TrainConfig

    return from_dict(TrainConfig, data, where="heads.json train")
