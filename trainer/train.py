"""Training loop of the fusion heads on streamed (query, neighbours) tensors.

Only the heads and the loss temperature train; CLIP embeddings are precomputed. AdamW with linear
warm-up then cosine decay, mixed precision on GPU, DDP under ``torchrun`` (the loss all-gathers
features with gradients, so N processes on a global batch compute the 1-process gradient).
Checkpoints (safetensors + JSON) hold everything needed to continue exactly: parameters,
optimiser, step (hence learning rate and data position), RNG states and the loss history.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
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

from reco.console import progress
from reco.errors import ConfigError, MismatchError, RecoError
from reco.formats import atomic_write_bytes, atomic_write_text
from reco.record import FILE as RECORD_FILE
from reco.record import Record, locked, options_of, outputs_of
from reco.trainer import checkpoint as ckpt_lib
from reco.trainer.data import TensorStream, context_fields, make_loader
from reco.trainer.tensors import read_tensors_info
from reco.trainer.heads import CLIP_B32_PARAMS, build_head, count_params
from reco.trainer.loss import RecoLoss

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "amp": torch.float16, "amp_bf16": torch.bfloat16}
RESUMABLE_CHANGES = ("steps", "checkpoint_every")      # train options that may differ on --resume


class RecoTrainModel(nn.Module):
    """Heads of the trained sides + the loss (holding the temperature): batch -> loss terms."""

    def __init__(self, heads: dict[str, nn.Module], loss: RecoLoss, fields: dict[str, str]):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.loss = loss
        self.fields = fields                       # side -> context field of the batch

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v = F.normalize(batch["v"].float(), dim=-1)
        t = F.normalize(batch["t"].float(), dim=-1)
        fused = {side: head(v if side == "image" else t, batch[self.fields[side]].float())
                 for side, head in self.heads.items()}
        return self.loss(v, t, fused.get("image"), fused.get("text"))


def build_train_model(train_cfg, dim: int, *, rank: int = 0, world_size: int = 1) -> RecoTrainModel:
    """Heads for the sides ``train_cfg`` fuses and a :class:`RecoLoss` (distributed-ready)."""
    sides = {"image": (train_cfg.fuse_image, train_cfg.image_context),
             "text": (train_cfg.fuse_text, train_cfg.text_context)}
    heads = {side: build_head(train_cfg.fusion, dim, train_cfg.head) for side, (on, _) in sides.items() if on}
    loss = RecoLoss(fuse_image=train_cfg.fuse_image, fuse_text=train_cfg.fuse_text,
                    init_temperature=train_cfg.init_temperature, local_loss=world_size > 1,
                    gather_with_grad=True, rank=rank, world_size=world_size)
    return RecoTrainModel(heads, loss, {side: field for side, (on, field) in sides.items() if on})


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on gains, biases, embeddings and the temperature (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr)


def lr_at(step: int, train_cfg) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``steps``."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    span = max(1, train_cfg.steps - train_cfg.warmup_steps)
    return 0.5 * train_cfg.lr * (1 + math.cos(math.pi * min(1.0, (step - train_cfg.warmup_steps) / span)))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], *,
               lr: float, device: torch.device, amp_dtype=None, scaler=None) -> dict[str, float]:
    """One optimiser step on ``batch``; returns the loss terms as floats (this rank's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(batch)
    if scaler is not None:
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out["loss"].backward()
        optimizer.step()
    unwrap(model).loss.clamp_()
    return {k: float(v.detach()) for k, v in out.items()}


def unwrap(model: nn.Module) -> RecoTrainModel:
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def process_group(device: str):
    """Initialise the default process group under ``torchrun`` (WORLD_SIZE > 1) and destroy it on
    the way out, after collecting the DDP wrapper that holds it: a Gloo group left to interpreter
    shutdown can abort the process ("terminate called without an active exception"). A group the
    caller initialised stays the caller's."""
    import torch.distributed as dist

    owned = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        if owned:
            gc.collect()
            dist.destroy_process_group()


def _global_rank() -> int:
    """This process's rank: the initialised group's, else torchrun's ``RANK`` (0 alone)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"clip.device={device}: CUDA is not available on this machine")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dev.index or 0)))
        torch.cuda.set_device(dev)
    return rank, world, dev


def _check(train_cfg, info, world: int) -> None:
    if train_cfg.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={train_cfg.precision!r}: choose one of {sorted(PRECISIONS)}")
    if train_cfg.batch_size % world:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} is not divisible by world size {world}")
    if not 0 < train_cfg.k <= info.k:
        raise ConfigError(f"train.k={train_cfg.k} must be in 1..{info.k} (neighbours stored in {info.folder})")
    if train_cfg.steps < 1 or train_cfg.checkpoint_every < 1:
        raise ConfigError("train.steps and train.checkpoint_every must be >= 1")


def _resume_state(folder: Path, model, optimizer, scaler, train_cfg, info, world: int) -> dict:
    model_t, optim_t, state, rng = ckpt_lib.load_checkpoint(folder)
    saved, now = state["train"], dataclasses.asdict(train_cfg)
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != _jsonable(now[k]))
    if diff:
        raise ConfigError(f"--resume from {folder}: train option(s) {diff} differ from the checkpoint "
                          f"({ {k: saved.get(k) for k in diff} }); use --out for a fresh run")
    if state["world_size"] != world:
        raise ConfigError(f"--resume from {folder}: saved with {state['world_size']} processes, "
                          f"now {world}; the data order would change")
    if state["data"]["rows"] != info.rows or state["data"]["shards"] != [os.path.basename(s) for s in info.shards]:
        raise MismatchError(f"--resume from {folder}: checkpoint was trained on other tensors than {info.folder}")
    model.load_state_dict(model_t)
    optimizer.load_state_dict(optim_t)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ckpt_lib.set_rng_state(rng)
    return state


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _plot(history: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = zip(*history) if history else ((), ())
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="RECO fusion heads: training loss")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _heads_meta(cfg, info, model: RecoTrainModel, history) -> dict[str, Any]:
    return {"train": dataclasses.asdict(cfg.train), "dim": info.dim, "k": cfg.train.k,
            "k_stored": info.k, "fields": {s: model.fields.get(s) for s in ckpt_lib.SIDES},
            "model_id": info.model_id, "fusion": cfg.train.fusion,
            "logit_scale": float(model.loss.scale().detach()), "steps": cfg.train.steps,
            "final_loss": history[-1][1] if history else None}


def train(cfg, *, out_dir: str | Path | None = None, resume: bool = False,
          force: bool = False) -> dict[str, Any]:
    """Train the fusion heads of ``cfg.train`` on ``cfg.paths.neighbours/tensors``.

    Args:
        cfg: RecoConfig (uses ``train``, ``paths``, ``clip.device``).
        out_dir: where heads, checkpoints, TensorBoard logs and the loss curve go
            (default ``cfg.paths.heads``).
        resume: continue from the latest checkpoint in ``out_dir`` (exactly: same later losses
            as an uninterrupted run); starts fresh when there is none.
        force: train again although ``out_dir`` holds heads (needed when they were trained
            with other options or tensors: refused otherwise, naming them).
    Returns: info dict (steps, losses, throughput, parameter counts, output paths); heads
    already trained with the same options on the same tensors (the folder's run record,
    ``record.json``) are not trained again: ``{"skipped": True, ...}``.
    """
    out = Path(out_dir) if out_dir is not None else Path(cfg.paths.heads)
    lock = locked(out, "train") if _global_rank() == 0 else contextlib.nullcontext()  # rank 0 writes
    with lock, process_group(cfg.clip.device):
        return _train(cfg, out, resume, force)


def train_record(cfg, info) -> Record:
    """What a heads folder's record holds: the train options (but checkpoint_every), the
    tensors' digest, the model."""
    return Record(stage="train", options=options_of("train", cfg.train, ("checkpoint_every",)),
                  inputs={"tensors": info.digest}, model_id=info.model_id)


def _reuse(out: Path, planned: Record, force: bool, resume: bool) -> dict | None:
    """The info of heads already trained as planned (None: train); StaleError for heads of
    other options or tensors (unless ``force`` or ``resume``, which checks its checkpoint)."""
    record = None if force or resume else Record.read(out, "train")
    if record is None:
        return None
    record.check_same(out, options=planned.options, inputs=planned.inputs,
                      model_id=planned.model_id, command="train")
    if not record.complete or not (out / ckpt_lib.HEADS_META).is_file():
        return None
    record.verify(out, command="train")
    meta = ckpt_lib.read_heads_meta(out)
    log.info("heads in %s are up to date; skipping (--force trains again)", out)
    return {"out_dir": str(out), "skipped": True, "steps": meta.get("steps"), "start_step": meta.get("steps"),
            "first_loss": None, "final_loss": meta.get("final_loss"), "samples_per_s": None,
            "head_params_per_side": None, "logit_scale": meta.get("logit_scale"), "world_size": None,
            "model_id": meta.get("model_id"), "heads": str(out / ckpt_lib.HEADS_WEIGHTS)}


def _hub_meta(cfg, info, out: Path) -> dict[str, Any]:
    """What loading the heads alone needs (``RecoModel.from_pretrained``): the CLIP spec (a
    ``local-dir:`` base CLIP relative to the heads folder) when the run's CLIP is the model the
    tensors were embedded with, and the memory index folder relative to the heads folder."""
    from reco.clip import model_identity, relative_spec, resolve_model_spec

    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    try:
        same = model_identity(model, pretrained) == info.model_id
    except RecoError:
        same = False
    if not same:
        log.info("heads: the run's CLIP %s is not the tensors' model %s; no CLIP spec recorded",
                 model, info.model_id)
    memory = Path(cfg.paths.index)
    return {"clip": relative_spec(model, pretrained, out) if same else None,
            "memory": os.path.relpath(memory.resolve(), out.resolve()) if memory.is_dir() else None}


def _train(cfg, out: Path, resume: bool, force: bool = False) -> dict[str, Any]:
    tc = cfg.train
    rank, world, device = _distributed(cfg.clip.device)
    fields = context_fields(tc)
    info = read_tensors_info(Path(cfg.paths.neighbours) / "tensors", need=fields)
    _check(tc, info, world)
    planned = train_record(cfg, info)
    reused = _reuse(out, planned, force, resume)
    if reused is not None:
        return reused
    amp_dtype = PRECISIONS[tc.precision] if device.type == "cuda" else None
    if tc.precision != "fp32" and amp_dtype is None:
        log.warning("train.precision=%s needs a GPU; training in fp32 on %s", tc.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    torch.manual_seed(tc.seed)
    model = build_train_model(tc, info.dim, rank=rank, world_size=world).to(device)
    optimizer = build_optimizer(model, tc)
    start, history, resumed = 0, [], None
    found = ckpt_lib.latest_checkpoint(out) if resume else None
    if found is not None:
        state = _resume_state(found, model, optimizer, scaler, tc, info, world)
        start, history, resumed = state["step"], state["history"], str(found)
        log.info("resuming from %s (step %d)", found, start)
    elif rank == 0:
        _clear_previous_run(out, "tb")       # the old run's checkpoints go at the first new one
    stale_checkpoints = rank == 0 and found is None
    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        net = nn.parallel.DistributedDataParallel(model, **ddp_kw)
    else:
        net = model

    stream = TensorStream(info, fields=fields, k=tc.k, batch_size=tc.batch_size // world,
                          shuffle_buffer=tc.shuffle_buffer, seed=tc.seed, rank=rank, world_size=world,
                          num_workers=tc.num_workers, start_step=start)
    batches = iter(make_loader(stream, pin_memory=device.type == "cuda"))
    writer = _writer(out, start) if rank == 0 else None
    t0, done = time.perf_counter(), 0
    bar = progress(total=tc.steps, initial=start, desc="train heads", unit="step",
                   **({"disable": True} if rank != 0 else {}))
    log_every = max(1, tc.steps // 20)
    for step in range(start, tc.steps):
        stats = train_step(net, optimizer, next(batches), lr=lr_at(step, tc), device=device,
                           amp_dtype=amp_dtype, scaler=scaler)
        stats["loss"] = _global_mean(stats["loss"], world, device)
        history.append([step + 1, stats["loss"]])
        done += 1
        if writer is not None:
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, step + 1)
            writer.add_scalar("train/lr", lr_at(step, tc), step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        if rank == 0 and ((step + 1) % log_every == 0 or step == start):
            log.debug("step %d/%d loss %.4f scale %.2f lr %.2e", step + 1, tc.steps, stats["loss"],
                      stats["logit_scale"], lr_at(step, tc))
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
            if stale_checkpoints:            # a fresh run: never leave older checkpoints beside
                _clear_previous_run(out, ckpt_lib.CHECKPOINTS)       # (a later --resume picks them)
                stale_checkpoints = False
            _save(out, step + 1, model, optimizer, scaler, tc, info, world, history, rank)
    bar.close()
    elapsed = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    if rank == 0:
        (out / RECORD_FILE).unlink(missing_ok=True)       # heads.json and record: last
        ckpt_lib.save_heads(out, dict(model.heads), {**_heads_meta(cfg, info, model, history),
                                                     **_hub_meta(cfg, info, out)})
        atomic_write_text(out / "history.json", json.dumps(history))
        _plot(history, out / "loss_curve.png")
        planned.outputs = outputs_of(out, [ckpt_lib.HEADS_WEIGHTS, ckpt_lib.HEADS_META])
        planned.counts, planned.complete = {"steps": tc.steps, "rows": info.rows}, True
        planned.write(out)
    _barrier(world)
    head_params = sum(count_params(h) for h in model.heads.values())
    return {"out_dir": str(out), "steps": tc.steps, "start_step": start, "resumed_from": resumed,
            "losses": [h[1] for h in history], "first_loss": history[0][1] if history else None,
            "final_loss": history[-1][1] if history else None, "world_size": world,
            "samples_per_s": done * tc.batch_size / elapsed if elapsed > 0 and done else None,
            "head_params": head_params, "head_params_per_side": {s: count_params(h) for s, h in model.heads.items()},
            "head_params_vs_clip_b32": {s: count_params(h) / CLIP_B32_PARAMS for s, h in model.heads.items()},
            "logit_scale": float(model.loss.scale().detach()), "dim": info.dim, "k": tc.k, "rows": info.rows,
            "model_id": info.model_id, "heads": str(out / ckpt_lib.HEADS_WEIGHTS)}


def _clear_previous_run(out: Path, *names: str) -> None:
    """A fresh run must not leave an older run's checkpoints (a later --resume would pick them)
    or TensorBoard events behind. The checkpoints are cleared when the new run writes its first
    one, so a run that fails before that leaves the previous run's checkpoints in place."""
    import shutil

    for name in names:
        if (out / name).exists():
            log.debug("fresh run: removing %s from a previous run", out / name)
            shutil.rmtree(out / name)


def _writer(out: Path, start: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)


def _global_mean(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _save(out: Path, step: int, model, optimizer, scaler, tc, info, world: int, history, rank: int) -> None:
    if rank == 0:
        state = {"train": _jsonable(dataclasses.asdict(tc)), "world_size": world, "history": history,
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "data": {"rows": info.rows, "shards": [os.path.basename(s) for s in info.shards],
                          "batches_per_rank": step, "num_workers": tc.num_workers}}
        path = ckpt_lib.save_checkpoint(out, step, model=model.state_dict(),
                                        optimizer=optimizer.state_dict(), state=state)
        log.debug("checkpoint %s", path)
    _barrier(world)
