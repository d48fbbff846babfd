"""Checkpoints and final heads as safetensors + JSON (never pickle).

A training checkpoint is a folder ``checkpoints/step-000200/`` with

* ``model.safetensors``   parameters of the trained heads and the loss temperature,
* ``optimizer.safetensors`` optimiser state tensors, flattened as ``state.<param>.<name>``,
* ``rng.safetensors``     torch CPU (and CUDA) generator states,
* ``state.json``          step, train config, optimiser param groups and non-tensor state,
                          loss history, data position, grad-scaler state (written last).

The folder is assembled under a temporary name and renamed, so a listed checkpoint is complete.
Final heads are ``heads.safetensors`` (``image.*`` / ``text.*`` parameters of the trained sides)
and ``heads.json`` (meta: train config, dim, k, fields, model_id, fusion, logit scale).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from reco.errors import FormatError, RecoError
from reco.formats import atomic_write_bytes, atomic_write_text, remove_temporaries

CHECKPOINTS = "checkpoints"
HEADS_WEIGHTS, HEADS_META = "heads.safetensors", "heads.json"
SIDES = ("image", "text")


# ---------------------------------------------------------------------------------------------
# optimiser state <-> (tensors, JSON)
# ---------------------------------------------------------------------------------------------

def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimiser ``state_dict()`` -> (flat tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(out_dir: str | Path, step: int, *, model: dict[str, torch.Tensor],
                    optimizer: dict, state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically (see module doc); returns its folder."""
    final = checkpoint_dir(out_dir, step)
    remove_temporaries(final.parent)              # a killed run's half-assembled checkpoint
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        opt_tensors, opt_rest = flatten_optimizer(optimizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, tmp / "model.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_state(), tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_rest}))
        old = final.with_name(f".{final.name}.tmp-old-{uuid.uuid4().hex[:8]}")
        if final.exists():                        # overwrite: move the old one aside by rename,
            os.replace(final, old)                # never show a half-deleted checkpoint
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(folder: str | Path) -> tuple[dict, dict, dict, dict]:
    """-> (model tensors, optimiser state_dict, state JSON, rng tensors)."""
    from reco.validate import CHECKPOINT_STATE_KEYS, read_json

    folder = Path(folder)
    state = read_json(folder / "state.json", CHECKPOINT_STATE_KEYS)   # FormatError naming the file
    try:
        model = load_file(folder / "model.safetensors")
        optim = unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state.pop("optimizer"))
        rng = load_file(folder / "rng.safetensors")
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError,
            SafetensorError) as exc:
        raise FormatError(f"{folder}: unreadable checkpoint ({exc})") from exc
    return model, optim, state, rng


# ---------------------------------------------------------------------------------------------
# final heads
# ---------------------------------------------------------------------------------------------

def save_heads(out_dir: str | Path, heads: dict[str, torch.nn.Module], meta: dict[str, Any]) -> None:
    """``heads.safetensors`` (``<side>.<param>``) then ``heads.json`` (written last)."""
    tensors = {f"{side}.{name}": p.detach().cpu().contiguous()
               for side, head in heads.items() for name, p in head.state_dict().items()}
    # heads.json marks complete heads: withdraw an older one before replacing the weights, so a
    # kill in between never pairs old meta with new weights
    (Path(out_dir) / HEADS_META).unlink(missing_ok=True)
    remove_temporaries(out_dir)
    atomic_write_bytes(save(tensors), Path(out_dir) / HEADS_WEIGHTS)
    atomic_write_text(Path(out_dir) / HEADS_META,
                      json.dumps({**meta, "sides": sorted(heads)}, indent=2, sort_keys=True))


def read_heads_meta(folder: str | Path) -> dict:
    """A heads folder's ``heads.json``, validated: typed keys (:data:`reco.validate.HEADS_META_KEYS`),
    ``train.head`` an object, ``sides`` among :data:`SIDES` (FormatError naming the file)."""
    from reco.validate import HEADS_META_KEYS, read_json

    meta_path = Path(folder) / HEADS_META
    meta = read_json(meta_path, HEADS_META_KEYS)          # typed keys; FormatError naming the file
    if not isinstance(meta["train"].get("head"), dict):
        raise FormatError(f"{meta_path}: missing train.head (the head config)")
    if not all(isinstance(s, str) and s in SIDES for s in meta["sides"]):
        raise FormatError(f"{meta_path}: sides {meta['sides']!r}, expected some of {SIDES}")
    return meta


def load_heads(folder: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Trained heads of a folder -> ({"image"/"text": head in eval mode}, meta).

    Only the sides that were trained are returned. ``meta`` holds ``train`` (the TrainConfig
    dict), ``dim``, ``k``, ``fields`` ({"image": field, "text": field}), ``model_id``, ``fusion``,
    ``logit_scale``.
    """
    from reco.config import from_dict
    from reco.trainer.config import HeadConfig
    from reco.trainer.heads import build_head

    folder = Path(folder)
    meta_path, weights_path = folder / HEADS_META, folder / HEADS_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise FormatError(f"{folder}: no trained heads ({HEADS_META} or {HEADS_WEIGHTS} missing); "
                          f"run `reco train`")
    meta = read_heads_meta(folder)
    try:
        tensors = load_file(weights_path)
    except FileNotFoundError as exc:
        raise FormatError(f"{folder}: no trained heads ({exc.filename} missing); run `reco train`") from exc
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise FormatError(f"{folder}: unreadable heads ({exc})") from exc
    head_cfg = from_dict(HeadConfig, meta["train"]["head"], where=f"{meta_path}:train.head")
    heads = {}
    for side in meta["sides"]:
        try:
            head = build_head(meta["fusion"], int(meta["dim"]), head_cfg)
        except (RecoError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"{meta_path}: cannot build the {side!r} head ({exc})") from exc
        prefix = f"{side}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FormatError(f"{weights_path}: {side} head does not match {meta_path} ({exc})") from exc
        heads[side] = head.to(device).eval()
    return heads, meta
