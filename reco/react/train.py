"""``reco react-train``: REACT's locked-text gated-image tuning on the customisation set.

The customisation set (``react-retrieve``) gives (image, caption) pairs. Captions are embedded once
with the frozen, locked text tower; images are decoded once into a tensor. Gated blocks are
inserted into the frozen image tower (:mod:`reco.react.gated`) and trained with CLIP's symmetric
InfoNCE between the customised image embedding and the locked text embedding, with a learned
temperature — the trainer's :class:`~reco.trainer.loss.RecoLoss` with only its image side on
(``NCE(V̄, T)``) — AdamW, linear warm-up + cosine decay (the trainer's ``lr_at``) and safetensors
checkpoints (the trainer's ``save_checkpoint``). The output folder holds ``gated.safetensors`` +
``gated.json``, loadable in one call with :meth:`reco.react.model.ReactModel.load`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reco import options as o
from reco.console import print_summary, progress, seconds
from reco.config import RecoConfig
from reco.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReactTrainConfig:
    """Options of REACT training (names follow :class:`reco.trainer.config.TrainConfig`)."""

    k_blocks: int = 2                 # gated blocks before each of the last k vision blocks
    init: str = "copy"                # copy | random (weights of the gated blocks; gates start at 0)
    steps: int = 600                  # tiny world (80 species): 100 steps +0, 300 +10, 600 +20 pts
    batch_size: int = 64
    lr: float = 2e-3
    gate_lr_scale: float = 20.0       # the tanh gates (alpha) learn this much faster
    weight_decay: float = 0.05
    warmup_steps: int = 20
    init_temperature: float | None = None   # None: the frozen CLIP's own temperature
    shift: int = 2                    # random-translation augmentation, pixels (0: none)
    checkpoint_every: int = 100
    image_source: str = "world"       # reco.react.images.SOURCES
    seed: int = 0
    log_every: int = 20

    SECTION = "react"
    RULES = dict(k_blocks=o.Range(1, 64), init=o.Choice(("copy", "random")), steps=o.Range(1, o.MAX_ROWS),
                 batch_size=o.Range(1, 1 << 16), lr=o.Range(0, 10, lo_open=True),
                 gate_lr_scale=o.Range(0, 1e4, lo_open=True), weight_decay=o.Range(0, 10),
                 warmup_steps=o.Range(0, o.MAX_ROWS), init_temperature=o.Range(0, 10, lo_open=True),
                 shift=o.Range(0, 1024), checkpoint_every=o.Range(1, o.MAX_ROWS), image_source=o.NON_EMPTY,
                 seed=o.SEED, log_every=o.Range(1, o.MAX_ROWS))

    def __post_init__(self):
        o.check(self)


def check_options(o: ReactTrainConfig) -> None:
    for name in ("steps", "batch_size", "k_blocks", "checkpoint_every", "log_every"):
        if getattr(o, name) < 1:
            raise ConfigError(f"react {name}={getattr(o, name)}: must be >= 1")
    if not (o.lr > 0 and o.gate_lr_scale > 0) or o.weight_decay < 0 or o.warmup_steps < 0 or o.shift < 0:
        raise ConfigError(f"react options out of range: lr={o.lr} gate_lr_scale={o.gate_lr_scale} "
                          f"weight_decay={o.weight_decay} warmup_steps={o.warmup_steps} "
                          f"shift={o.shift}")


def default_out_dir(cfg: RecoConfig) -> Path:
    return cfg.paths.react / "model"


@torch.no_grad()
def text_targets(clip, captions: list[str], batch_size: int = 512) -> torch.Tensor:
    """Locked text tower: L2-normalised caption embeddings, computed once."""
    from reco.clip import encode_texts

    return torch.cat([encode_texts(clip, captions[i:i + batch_size])
                      for i in range(0, len(captions), batch_size)])


def random_shift(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (replicate padding, then crop)."""
    if shift <= 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _loss(init_temperature: float):
    from reco.trainer.loss import RecoLoss

    return RecoLoss(fuse_image=True, fuse_text=False, init_temperature=init_temperature)


def build_optimizer(model: nn.Module, loss: nn.Module, o: ReactTrainConfig) -> torch.optim.AdamW:
    """AdamW over the gated blocks and the temperature: weight decay on matrices only (as
    open_clip); the gates get ``gate_lr_scale`` x the learning rate (``lr_scale`` per group)."""
    from reco.react.gated import trainable_parameters

    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, p in trainable_parameters(model).items():
        key = "gates" if name.rsplit(".", 1)[-1].startswith("alpha_") else (
            "decay" if p.ndim >= 2 else "no_decay")
        groups[key].append(p)
    groups["no_decay"].append(loss.logit_scale)
    spec = {"decay": (o.weight_decay, 1.0), "no_decay": (0.0, 1.0), "gates": (0.0, o.gate_lr_scale)}
    return torch.optim.AdamW([{"params": ps, "weight_decay": spec[k][0], "lr_scale": spec[k][1]}
                              for k, ps in groups.items() if ps], lr=o.lr)


def _meta(clip, options: ReactTrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model_id": clip.model_id, "base_model": clip.name, "base_pretrained": clip.pretrained,
            "embed_dim": clip.embed_dim, "image_size": clip.image_size,
            "react": dataclasses.asdict(options), **extra}


def react_train(cfg: RecoConfig, *, k_blocks: int | None = None, steps: int | None = None,
                out_dir: str | Path | None = None, options: ReactTrainConfig | None = None,
                customisation: str | Path | None = None, evaluate: bool = True,
                clip=None) -> dict[str, Any]:
    """Train REACT gated blocks on the customisation set; returns an info dict.

    Args:
        k_blocks, steps: override ``options.k_blocks`` / ``options.steps``.
        out_dir: output folder (default ``cfg.paths.react / "model"``).
        options: :class:`ReactTrainConfig` (default values otherwise).
        customisation: the set written by react-retrieve (default
            ``cfg.paths.react / customisation.parquet``).
        evaluate: zero-shot evaluation of frozen CLIP vs REACT on the world's test split after
            training (written to ``out_dir/eval.json``).
        clip: an already loaded frozen CLIP (default: the pipeline's base CLIP).
    """
    from reco.react import images, retrieve
    from reco.react.gated import customise, gates, save_gated, trainable_parameters
    from reco.trainer.checkpoint import save_checkpoint
    from reco.trainer.train import lr_at

    options = options or ReactTrainConfig()
    options = dataclasses.replace(options, **{k: v for k, v in
                                              (("k_blocks", k_blocks), ("steps", steps)) if v is not None})
    check_options(options)
    images.get_source(options.image_source)
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    table = retrieve.read_customisation_set(customisation or cfg.paths.react / retrieve.SET_FILE)
    clip = clip or retrieve.load_frozen_clip(cfg)
    torch.manual_seed(options.seed)
    t0 = time.perf_counter()
    pixels = images.load_pixels(cfg, table, clip.preprocess, source=options.image_source)
    targets = text_targets(clip, table.column("caption").to_pylist())
    decode_s = time.perf_counter() - t0

    model = customise(clip.model, options.k_blocks, init=options.init)
    temperature = options.init_temperature or float(1.0 / clip.model.logit_scale.exp())
    loss_fn = _loss(temperature)
    optimizer = build_optimizer(model, loss_fn, options)
    generator = torch.Generator().manual_seed(options.seed)
    n, batch = pixels.shape[0], min(options.batch_size, pixels.shape[0])
    order, cursor, history = torch.randperm(n, generator=generator), 0, []
    t1 = time.perf_counter()
    bar = progress(total=options.steps, desc="react-train", unit="step")
    for step in range(options.steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        lr = lr_at(step, options)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        model.train()
        v_bar = F.normalize(model.encode_image(random_shift(pixels[idx], options.shift, generator)), dim=-1)
        terms = loss_fn(None, targets[idx], v_bar=v_bar)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        loss_fn.clamp_()
        history.append([step + 1, float(terms["loss"].detach()), lr])
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1][1]:.4f}", refresh=False)
        if (step + 1) % options.log_every == 0 or step == 0:
            log.debug("react step %d/%d loss %.4f lr %.2e gates %s", step + 1, options.steps,
                     history[-1][1], lr, gates(model))
        if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
            state = {k: v for k, v in trainable_parameters(model).items()}
            state["loss.logit_scale"] = loss_fn.logit_scale
            save_checkpoint(out, step + 1, model=state, optimizer=optimizer.state_dict(),
                            state={"react": dataclasses.asdict(options), "history": history})
    bar.close()
    train_s = time.perf_counter() - t1
    model.eval()
    meta = _meta(clip, options, {"pairs": n, "steps_done": options.steps,
                                 "logit_scale": float(loss_fn.scale().detach()),
                                 "customisation": str(customisation or cfg.paths.react / retrieve.SET_FILE)})
    save_gated(model, out, extra=meta)
    info = {"out": str(out), "pairs": n, "steps": options.steps, "k_blocks": options.k_blocks,
            "first_loss": history[0][1], "final_loss": history[-1][1], "gates": gates(model),
            "decode_seconds": round(decode_s, 2), "train_seconds": round(train_s, 2),
            "trainable_params": int(sum(p.numel() for p in trainable_parameters(model).values())),
            "model_id": clip.model_id}
    from reco.formats import atomic_write_text

    atomic_write_text(out / "train.json", json.dumps({**info, "history": history}, indent=2))
    if evaluate and not cfg.paths.urls("test").is_file():
        log.warning("no labelled test split %s; skipping the zero-shot evaluation", cfg.paths.urls("test"))
    elif evaluate:
        from reco.react.evaluate import evaluate_react

        info["zeroshot"] = evaluate_react(cfg, out, clip=clip, react_model=model,
                                          image_source=options.image_source)
    return info


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ReactTrainConfig()
    parser.add_argument("--k-blocks", type=int, default=d.k_blocks,
                        help="gated blocks, one before each of the last K vision blocks")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--gate-lr-scale", type=float, default=d.gate_lr_scale,
                        help="learning-rate multiplier of the tanh gates")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--init", choices=("copy", "random"), default=d.init,
                        help="gated-block weights: copy of the next block, or random")
    parser.add_argument("--shift", type=int, default=d.shift, help="random-shift augmentation (px)")
    parser.add_argument("--image-source", default=d.image_source,
                        help="where image pixels come from: world | embedded")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--customisation", default=None,
                        help="customisation set (default: WORKDIR/react/customisation.parquet)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/react/model)")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    options = ReactTrainConfig(
        k_blocks=args.k_blocks, init=args.init, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, gate_lr_scale=args.gate_lr_scale, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        shift=args.shift, image_source=args.image_source, seed=args.seed)
    info = react_train(cfg, options=options, out_dir=args.out, customisation=args.customisation,
                       evaluate=not args.no_eval)
    zs = {m: r["all"]["top1"] for m, r in (info.get("zeroshot") or {}).items() if m in ("frozen", "react")}
    print_summary("react-train", {
        "steps": f"{info['steps']} on {info['pairs']} pairs in {seconds(info['train_seconds'])}, "
                 f"{info['k_blocks']} gated blocks ({info['trainable_params']:,} parameters)",
        "loss": f"{info['first_loss']:.4f} -> {info['final_loss']:.4f}",
        "zero-shot": f"top-1 frozen CLIP {zs['frozen']:.1f} -> REACT {zs['react']:.1f}" if len(zs) == 2 else None,
        "output": info["out"]}, data=info)
    return 0 if math.isfinite(info["final_loss"]) else 1
