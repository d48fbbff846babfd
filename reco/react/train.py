"""``reco react-train``: REACT's locked-text gated-image tuning on the customisation set.

The customisation set (``react-retrieve``, images from ``react-download``) gives (image, caption)
pairs, streamed from webdataset shards (:mod:`reco.react.data`; or a tensor in memory for the
test fixtures); captions are embedded by the frozen, locked text tower. Gated blocks are
inserted into the frozen image tower (:mod:`reco.react.gated`) and trained with CLIP's symmetric
InfoNCE between the customised image embedding and the locked text embedding, with a learned
temperature — the trainer's :class:`~reco.trainer.loss.RecoLoss` with only its image side on
(``NCE(V̄, T)``) — AdamW, linear warm-up + cosine decay (the trainer's ``lr_at``) and safetensors
checkpoints (the trainer's ``save_checkpoint``). The output folder holds ``gated.safetensors`` +
``gated.json``, loadable in one call with :meth:`reco.react.model.ReactModel.load`.

Options: the run config's ``react`` section (``--set react.steps=300``). Under ``torchrun`` the
gated blocks and the temperature train with DDP (gloo on CPU, nccl with ``--device cuda``, one GPU per rank; the loss all-gathers
the embeddings); checkpoints every ``react.checkpoint_every`` steps (safetensors) and
``react.resume=true`` continues exactly from the last one; TensorBoard events in ``OUT/tb``; a
tqdm bar with ETA on rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reco.console import print_summary, progress, seconds
from reco.config import RecoConfig
from reco.errors import ConfigError
from reco.react.config import ReactConfig

log = logging.getLogger(__name__)


ReactTrainConfig = ReactConfig        # the ``react`` section of the run config (older name)
WARM_STEPS = 3    # steps left out of ``steady_samples_per_s`` (DataLoader workers start, buffers fill)


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


def random_shift(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (replicate padding, then crop)."""
    if shift <= 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _loss(init_temperature: float, rank: int = 0, world: int = 1):
    from reco.trainer.loss import RecoLoss

    return RecoLoss(fuse_image=True, fuse_text=False, init_temperature=init_temperature,
                    gather_with_grad=world > 1, rank=rank, world_size=world)


class _Step(nn.Module):
    """What DDP wraps: customised image tower + loss -> loss terms of a batch."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, pixels: torch.Tensor, targets: torch.Tensor) -> dict:
        v_bar = F.normalize(self.model.encode_image(pixels), dim=-1)
        return self.loss(None, targets, v_bar=v_bar)


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
                out_dir: str | Path | None = None, options: ReactConfig | None = None,
                customisation: str | Path | None = None, evaluate: bool = True,
                clip=None) -> dict[str, Any]:
    """Train REACT gated blocks on the customisation set; returns an info dict.

    Args:
        k_blocks, steps: override ``options.k_blocks`` / ``options.steps``.
        out_dir: output folder (default ``cfg.paths.react / "model"``).
        options: :class:`ReactConfig` (default ``cfg.react``).
        customisation: the set written by react-retrieve (in-memory sources; default
            ``cfg.paths.react / customisation.parquet``).
        evaluate: zero-shot evaluation of frozen CLIP vs REACT on the labelled test split after
            training (``out_dir/eval.json``; images from ``react.eval_shards`` when streaming).
        clip: an already loaded frozen CLIP (default: the pipeline's base CLIP).
    """
    from reco.trainer.train import process_group

    options = options or cfg.react
    options = dataclasses.replace(options, **{k: v for k, v in
                                              (("k_blocks", k_blocks), ("steps", steps)) if v is not None})
    check_options(options)
    if options.image_source != "shards":
        from reco.react import images

        images.get_source(options.image_source)
    device = cfg.clip.device
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))     # "cuda" = this rank's GPU
    with process_group(device):
        return _train(cfg, options, Path(out_dir) if out_dir else default_out_dir(cfg),
                      customisation, evaluate, clip)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _train(cfg, options: ReactConfig, out: Path, customisation, evaluate: bool, clip) -> dict[str, Any]:
    from reco.react import retrieve
    from reco.react.data import barrier, make_batches
    from reco.react.gated import customise, gates, save_gated, trainable_parameters
    from reco.trainer.train import lr_at

    rank, world = _rank_world()
    set_path = customisation or cfg.paths.react / retrieve.SET_FILE
    table = None if options.image_source == "shards" else retrieve.read_customisation_set(set_path)
    clip = clip or retrieve.load_frozen_clip(cfg)
    t0 = time.perf_counter()
    batches = make_batches(cfg, clip, options, rank, world, table, targets_dir=out / "targets")
    decode_s = time.perf_counter() - t0
    torch.manual_seed(options.seed)
    model = customise(clip.model, options.k_blocks, init=options.init)
    device = next(model.parameters()).device
    temperature = options.init_temperature or float(1.0 / clip.model.logit_scale.exp())
    loss_fn = _loss(temperature, rank, world)
    optimizer = build_optimizer(model, loss_fn, options)
    step_module = _Step(model, loss_fn)
    start, history = _resume_or_clear(out, options, model, loss_fn, optimizer, rank)
    net = _ddp(step_module, device) if world > 1 else step_module
    writer, bar = _monitors(out, options, start, rank)
    t1, it = time.perf_counter(), iter(batches(start))
    warm = min(start + WARM_STEPS, options.steps - 1)
    t_warm = t1
    for step in range(start, options.steps):
        if step == warm:
            t_warm = time.perf_counter()                 # loader start-up and first steps done
        pixels, targets = (t.to(device, non_blocking=True) for t in next(it))
        lr = lr_at(step, options)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 101 + rank)
        model.train()
        terms = net(random_shift(pixels, options.shift, g), targets)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        loss_fn.clamp_()
        history.append([step + 1, _global_mean(float(terms["loss"].detach()), world), lr])
        _report(writer, bar, history[-1], step, options, model if rank == 0 else None)
        if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps and rank == 0:
            _checkpoint(out, step + 1, model, loss_fn, optimizer, options, history, world)
    t_end = time.perf_counter()
    train_s = t_end - t1
    if bar is not None:
        bar.close()
        writer.close()
    model.eval()
    done = options.steps - start
    info = {"out": str(out), "pairs": batches.pairs, "steps": options.steps, "start_step": start,
            "k_blocks": options.k_blocks, "world_size": world, "image_source": options.image_source,
            "first_loss": history[0][1] if history else None,
            "final_loss": history[-1][1] if history else None, "gates": gates(model),
            "decode_seconds": round(decode_s, 2), "train_seconds": round(train_s, 2),
            "samples_per_s": round(done * options.batch_size / train_s, 2) if train_s > 0 and done else None,
            "steady_samples_per_s": (round((options.steps - warm) * options.batch_size / (t_end - t_warm), 2)
                                     if options.steps > warm > start and t_end > t_warm else None),
            "trainable_params": int(sum(p.numel() for p in trainable_parameters(model).values())),
            "model_id": clip.model_id}
    if rank == 0:
        save_gated(model, out, extra=_meta(clip, options, {
            "pairs": batches.pairs, "steps_done": options.steps, "customisation": str(set_path),
            "logit_scale": float(loss_fn.scale().detach())}))
        from reco.formats import atomic_write_text

        atomic_write_text(out / "train.json", json.dumps({**info, "history": history}, indent=2))
        if evaluate:
            info["zeroshot"] = _evaluate(cfg, out, clip, model, options)
    barrier(world)
    return info


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    ids = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(module, **ids)


def _evaluate(cfg, out: Path, clip, model, options: ReactConfig):
    source = options.image_source if options.image_source != "shards" else (
        "webdataset" if options.eval_shards else None)
    if source is None or not cfg.paths.urls("test").is_file():
        log.warning("no labelled test split with images (%s; react.eval_shards=%s); skipping the "
                    "zero-shot evaluation", cfg.paths.urls("test"), options.eval_shards)
        return None
    from reco.react.evaluate import evaluate_react

    return evaluate_react(cfg, out, clip=clip, react_model=model, image_source=source)


def _resume_or_clear(out: Path, o: ReactConfig, model, loss_fn, optimizer, rank: int):
    """(start step, history): the last checkpoint's when ``react.resume``; else a fresh run
    whose older checkpoints and TensorBoard events are removed (rank 0)."""
    import shutil

    from reco.react.gated import trainable_parameters
    from reco.trainer.checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint

    last = latest_checkpoint(out) if o.resume else None
    if last is None:
        if rank == 0 and not o.resume:
            for name in (CHECKPOINTS, "tb"):
                shutil.rmtree(out / name, ignore_errors=True)
        return 0, []
    tensors, optim, state, _ = load_checkpoint(last)
    params = {**trainable_parameters(model), "loss.logit_scale": loss_fn.logit_scale}
    if set(tensors) != set(params):
        raise ConfigError(f"{last}: checkpoint parameters do not match react.k_blocks="
                          f"{o.k_blocks}; resume with the options it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(optim)
    log.info("react-train: resuming from %s (step %d)", last, state["step"])
    return int(state["step"]), [list(h) for h in state["history"]]


def _checkpoint(out: Path, step: int, model, loss_fn, optimizer, o: ReactConfig, history, world: int):
    from reco.react.gated import trainable_parameters
    from reco.trainer.checkpoint import save_checkpoint

    state = {**trainable_parameters(model), "loss.logit_scale": loss_fn.logit_scale}
    save_checkpoint(out, step, model=state, optimizer=optimizer.state_dict(),
                    state={"train": dataclasses.asdict(o), "world_size": world,
                           "data": {"image_source": o.image_source, "batches_done": step},
                           "history": history})


def _monitors(out: Path, o: ReactConfig, start: int, rank: int):
    """(TensorBoard writer, tqdm bar with ETA) on rank 0; (None, None) elsewhere."""
    if rank != 0:
        return None, None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
    return writer, progress(total=o.steps, initial=start, desc="react-train", unit="step")


def _report(writer, bar, record, step: int, o: ReactConfig, model) -> None:
    if bar is None:
        return
    from reco.react.gated import gates

    _, loss, lr = record
    writer.add_scalar("react/loss", loss, step + 1)
    writer.add_scalar("react/lr", lr, step + 1)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
        for j, g in enumerate(gates(model)):
            writer.add_scalar(f"react/gate{j}_attn", g["attn"], step + 1)
            writer.add_scalar(f"react/gate{j}_mlp", g["mlp"], step + 1)
        log.debug("react step %d/%d loss %.4f lr %.2e eta %s", step + 1, o.steps, loss, lr,
                  _eta(bar))


def _eta(bar) -> str:
    if getattr(bar, "disable", False):          # no bar (-q, not a terminal)
        return "?"
    rate = bar.format_dict.get("rate")
    left = bar.total - bar.n
    return f"{left / rate:.0f}s" if rate else "?"


def _global_mean(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


# ---------------------------------------------------------------------------------------------
# CLI: options come from the run config (--set react.*)
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--customisation", default=None,
                        help="customisation set (default: WORKDIR/react/customisation.parquet)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/react/model)")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    info = react_train(cfg, out_dir=args.out, customisation=args.customisation,
                       evaluate=not args.no_eval)
    if _rank_world()[0] != 0:
        return 0 if info["final_loss"] is None or math.isfinite(info["final_loss"]) else 1
    zs = {m: r["all"]["top1"] for m, r in (info.get("zeroshot") or {}).items() if m in ("frozen", "react")}
    first, final = info.get("first_loss"), info.get("final_loss")
    print_summary("react-train", {
        "steps": f"{info['steps']} on {info['pairs']} pairs in {seconds(info['train_seconds'])}, "
                 f"{info['k_blocks']} gated blocks ({info['trainable_params']:,} parameters)"
                 + (f", resumed at step {info['start_step']}" if info.get("start_step") else ""),
        "loss": f"{first:.4f} -> {final:.4f}" if first is not None and final is not None else None,
        "zero-shot": f"top-1 frozen CLIP {zs['frozen']:.1f} -> REACT {zs['react']:.1f}" if len(zs) == 2 else None,
        "output": info["out"]}, data=info)
    return 0 if final is None or math.isfinite(final) else 1
