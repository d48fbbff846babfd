"""The world's base CLIP: a small open_clip model trained from scratch on the pretraining split.

Pretraining captions describe the look of a specimen and only rarely name its species, so the
model is aligned on attributes (zero-shot by attribute prompts works) but weak on species names:
the gap RECO's memory is meant to close. Saved with :func:`reco.clip.save_local_dir`; frozen
afterwards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reco.clip import CONFIG_FILE, LOCAL_DIR, WEIGHTS_FILE, LoadedClip, load_clip, save_local_dir
from reco.console import dropped, progress
from reco.errors import FormatError
from reco.formats import atomic_write_text, read_parquet
from reco.world.captions import attribute_prompt, name_prompt
from reco.world.config import BaseClipConfig
from reco.world.species import load_species

log = logging.getLogger(__name__)
INFO_FILE = "info.json"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def load_split(world_dir: str | Path, split: str) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Images of a split read from disk (rows whose file is missing are skipped), decoded once:
    (uint8 tensor (n, 3, H, W), captions, labels)."""
    world = Path(world_dir)
    info = json.loads((world / "world.json").read_text())
    table = read_parquet(world / "urls" / f"{split}.parquet", required=["url", "caption", "label"])
    base = info["base_url"]
    images, captions, labels = [], [], []
    for url, text, label in zip(*(table.column(c).to_pylist() for c in ("url", "caption", "label"))):
        if not url.startswith(base):
            raise FormatError(f"{world}/urls/{split}.parquet: url {url!r} not under {base}")
        path = world / url[len(base):]
        if not path.is_file():
            continue
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            images.append(np.asarray(im.convert("RGB")))
        captions.append(text)
        labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions, np.asarray(labels, dtype=np.int64)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float, open_clip (OpenAI) mean/std normalisation."""
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips (the look of a species is flip invariant)."""
    flip_h = torch.rand(len(pixels), generator=gen) < 0.5
    flip_v = torch.rand(len(pixels), generator=gen) < 0.5
    pixels = torch.where(flip_h.view(-1, 1, 1, 1), pixels.flip(3), pixels)
    return torch.where(flip_v.view(-1, 1, 1, 1), pixels.flip(2), pixels)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if plain else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_base_clip(cfg: BaseClipConfig, world_dir: str | Path, out_dir: str | Path,
                    seed: int = 0, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Train ``cfg.model`` from random init on the world's pretraining split and save it.

    Args:
        cfg: model name, steps, batch size, optimiser settings, torch threads.
        world_dir: the world folder (``urls/pretrain.parquet`` and its images).
        out_dir: where ``open_clip_config.json`` + weights (+ ``info.json``) are written.
        seed: torch seed (init, batches, augmentation).
        extra: recorded in the saved config and info (e.g. a cache key).
    Returns:
        (``local-dir:`` spec of the saved model, info with times, losses and zero-shot accuracies).
    """
    import open_clip

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    pixels, captions, _ = load_split(world_dir, "pretrain")
    with dropped("", "No pretrained weights loaded"):      # random init is the point here
        clip = load_clip(cfg.model, pretrained=None)
    tokens = clip.tokenizer(captions)
    load_seconds = time.perf_counter() - start
    model = clip.model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_with_warmup(s, cfg.warmup, cfg.steps))
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(len(pixels), generator=gen), 0, []
    train_start, cpu_start = time.perf_counter(), time.process_time()
    bar = progress(total=cfg.steps, desc="world: base CLIP", unit="step")
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(pixels), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        image_f, text_f, scale = model(normalise(_augment(pixels[idx], gen)), tokens[idx])[:3]
        loss = loss_fn(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if step % 25 == 0 or step == cfg.steps - 1:
            log.debug("base clip step %d/%d loss %.3f (%.1f s)", step + 1, cfg.steps, losses[-1],
                      time.perf_counter() - train_start)
    bar.close()
    train_seconds, cpu_seconds = time.perf_counter() - train_start, time.process_time() - cpu_start
    model.eval()
    extra = dict(extra or {})
    spec = save_local_dir(model, cfg.model, out_dir, extra={**extra, "config": dataclasses.asdict(cfg)})
    clip = load_clip(spec)
    info = {
        **extra,
        "spec": spec, "model_id": clip.model_id, "config": dataclasses.asdict(cfg), "seed": seed,
        "pretrain_pairs": len(pixels), "load_seconds": round(load_seconds, 2),
        "train_seconds": round(train_seconds, 2), "train_cpu_seconds": round(cpu_seconds, 2),
        "threads": torch.get_num_threads(),
        "final_loss": round(float(np.mean(losses[-10:])), 4), "first_loss": round(losses[0], 4),
        "zero_shot": zero_shot(clip, world_dir),
    }
    atomic_write_text(Path(out_dir) / INFO_FILE, json.dumps(info, indent=2, sort_keys=True))
    return spec, info


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot(clip: LoadedClip, world_dir: str | Path, split: str = "test",
              batch_size: int = 512) -> dict[str, float]:
    """Top-1 zero-shot accuracy on a split with (a) one attribute prompt per species ("a photo
    of a red circle with blue stripes.") and (b) one name prompt ("a photo of a velar
    thornwick."); also the seen/unseen split of (b)."""
    species, seen, unseen = load_species(Path(world_dir) / "species.json")
    pixels, _, labels = load_split(world_dir, split)
    feats = torch.cat([clip.model.encode_image(normalise(pixels[i:i + batch_size])).float()
                       for i in range(0, len(pixels), batch_size)])
    feats = torch.nn.functional.normalize(feats, dim=-1)
    out = {"n_images": len(labels)}
    for kind, prompt in (("attribute", attribute_prompt), ("name", name_prompt)):
        text = torch.nn.functional.normalize(
            clip.model.encode_text(clip.tokenizer([prompt(s) for s in species])).float(), dim=-1)
        pred = (feats @ text.T).argmax(1).numpy()
        correct = pred == labels
        out[f"{kind}_top1"] = round(float(correct.mean()), 4)
        for group, ids in (("seen", seen), ("unseen", unseen)):
            mask = np.isin(labels, ids)
            if mask.any():
                out[f"{kind}_top1_{group}"] = round(float(correct[mask].mean()), 4)
    return out


# ---------------------------------------------------------------------------------------------
# idempotent entry point
# ---------------------------------------------------------------------------------------------

def base_clip_key(cfg: BaseClipConfig, world_key: str, seed: int) -> str:
    """Hash of what determines the trained weights (world, training config, model config, seed)."""
    import open_clip
    from reco.clip import register_project_configs

    register_project_configs()
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}
    data.update(world=world_key, seed=seed, model_cfg=open_clip.get_model_config(cfg.model))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def read_info(out_dir: str | Path) -> dict[str, Any] | None:
    folder = Path(out_dir)
    if not ((folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
            and (folder / INFO_FILE).is_file()):
        return None
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except json.JSONDecodeError:
        return None


def ensure_base_clip(cfg: BaseClipConfig, world_dir: str | Path, out_dir: str | Path, seed: int,
                     world_key: str) -> dict[str, Any]:
    """Train the base CLIP unless ``out_dir`` already holds one with the same key."""
    key = base_clip_key(cfg, world_key, seed)
    info = read_info(out_dir)
    if info is not None and info.get("key") == key:
        return {**info, "action": "kept", "spec": LOCAL_DIR + str(out_dir)}
    log.info("training base CLIP %s (%d steps)", key, cfg.steps)
    _, info = train_base_clip(cfg, world_dir, out_dir, seed=seed, extra={"key": key, "world_key": world_key})
    return {**info, "action": "trained"}
