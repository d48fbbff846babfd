"""REACT's locked-text gated-image tuning: gated residual blocks inside a frozen open_clip ViT.

:func:`customise` inserts one :class:`GatedResidualBlock` before each of the last ``k`` blocks of
``model.visual.transformer.resblocks``. A gated block is an open_clip ``ResidualAttentionBlock``
(same width, heads, MLP width, activation, norm and layer scale as the block it precedes) whose
two residual branches are scaled by ``tanh(alpha)``, with ``alpha`` initialised to 0: the
customised model starts as exactly the frozen CLIP. Every original weight (image and text tower,
``logit_scale``) is frozen; only the gated blocks train.

Only the new parameters are saved (:func:`save_gated`: safetensors + JSON, never pickle);
:func:`load_gated` re-applies them to a freshly loaded base CLIP.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reco.errors import ConfigError, FormatError, MismatchError

WEIGHTS_FILE = "gated.safetensors"
META_FILE = "gated.json"
FORMAT = "reco-react-gated/1"
INITS = ("copy", "random")   # copy: start from the weights of the block it precedes


def _block_classes():
    from open_clip.transformer import LayerScale, ResidualAttentionBlock

    return LayerScale, ResidualAttentionBlock


class GatedResidualBlock(_block_classes()[1]):
    """``x + tanh(a_attn) * attn(ln_1(x)); x + tanh(a_mlp) * mlp(ln_2(x))`` (a_* start at 0)."""

    def __init__(self, d_model: int, n_head: int, *, mlp_ratio: float = 4.0,
                 ls_init_value: float | None = None, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm, batch_first: bool = True):
        super().__init__(d_model, n_head, mlp_ratio, ls_init_value=ls_init_value,
                         act_layer=act_layer, norm_layer=norm_layer, batch_first=batch_first)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_mlp = nn.Parameter(torch.zeros(()))

    @classmethod
    def like(cls, block: nn.Module, init: str = "copy") -> "GatedResidualBlock":
        """A gated block shaped like the open_clip ``ResidualAttentionBlock`` ``block``."""
        layer_scale, residual_block = _block_classes()
        if type(block) is not residual_block:
            raise ConfigError(f"REACT gated blocks need open_clip ResidualAttentionBlock vision "
                              f"blocks, got {type(block).__name__} (custom-block ViTs unsupported)")
        if init not in INITS:
            raise ConfigError(f"react init {init!r}: choose one of {', '.join(INITS)}")
        width = block.ln_1.normalized_shape[0]
        gated = cls(width, block.attn.num_heads,
                    mlp_ratio=block.mlp.c_fc.out_features / width,
                    ls_init_value=1e-5 if isinstance(block.ls_1, layer_scale) else None,
                    act_layer=type(block.mlp.gelu), norm_layer=type(block.ln_1),
                    batch_first=block.attn.batch_first)
        ref = next(block.parameters())
        gated.to(device=ref.device, dtype=ref.dtype)
        if init == "copy":
            missing, unexpected = gated.load_state_dict(block.state_dict(), strict=False)
            assert set(missing) == {"alpha_attn", "alpha_mlp"} and not unexpected
        return gated

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        gate_attn = torch.tanh(self.alpha_attn).to(q_x.dtype)
        gate_mlp = torch.tanh(self.alpha_mlp).to(q_x.dtype)
        x = q_x + gate_attn * self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + gate_mlp * self.ls_2(self.mlp(self.ln_2(x)))


def _resblocks(clip_model: nn.Module) -> nn.ModuleList:
    try:
        return clip_model.visual.transformer.resblocks
    except AttributeError as exc:
        raise ConfigError(f"REACT needs an open_clip VisionTransformer image tower "
                          f"(model.visual.transformer.resblocks); {type(clip_model).__name__} "
                          f"has none") from exc


def gated_blocks(clip_model: nn.Module) -> list[GatedResidualBlock]:
    """The gated blocks of a customised model, in depth order (empty if not customised)."""
    return [b for b in _resblocks(clip_model) if isinstance(b, GatedResidualBlock)]


def customise(clip_model: nn.Module, k_blocks: int, *, init: str = "copy",
              inplace: bool = False) -> nn.Module:
    """Insert a gated block before each of the last ``k_blocks`` vision blocks and freeze the rest.

    Args:
        clip_model: an open_clip CLIP with a ViT image tower.
        k_blocks: how many of the last vision blocks get a gated block before them (1..layers).
        init: ``copy`` (gated block starts from the weights of the block it precedes) or
            ``random`` (open_clip's default initialisation); either way the gates start at 0.
        inplace: modify ``clip_model`` itself instead of a deep copy.
    Returns the customised model; only the gated blocks' parameters require grad.
    """
    blocks = _resblocks(clip_model)
    if gated_blocks(clip_model):
        raise ConfigError("model is already REACT-customised (it has gated blocks)")
    if not 1 <= int(k_blocks) <= len(blocks):
        raise ConfigError(f"react k_blocks={k_blocks}: must be in 1..{len(blocks)} "
                          f"(the image tower has {len(blocks)} blocks)")
    model = clip_model if inplace else copy.deepcopy(clip_model)
    model.requires_grad_(False)
    blocks = _resblocks(model)
    first = len(blocks) - int(k_blocks)
    new_blocks: list[nn.Module] = []
    for i, block in enumerate(blocks):
        if i >= first:
            new_blocks.append(GatedResidualBlock.like(block, init=init).requires_grad_(True))
        new_blocks.append(block)
    model.visual.transformer.resblocks = nn.ModuleList(new_blocks)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of the gated blocks (``blocks.{j}.{param}``, j in depth order)."""
    return {f"blocks.{j}.{name}": p for j, block in enumerate(gated_blocks(model))
            for name, p in block.named_parameters()}


def gates(model: nn.Module) -> list[dict[str, float]]:
    """Current ``tanh(alpha)`` of each gated block (how far the model is from the frozen CLIP)."""
    return [{"attn": float(torch.tanh(b.alpha_attn.detach())),
             "mlp": float(torch.tanh(b.alpha_mlp.detach()))}
            for b in gated_blocks(model)]


def save_gated(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write only the gated blocks: ``gated.safetensors`` + ``gated.json`` (atomically)."""
    from safetensors.torch import save

    from reco.formats import atomic_write_bytes, atomic_write_text

    params = trainable_parameters(model)
    if not params:
        raise ConfigError("model has no gated blocks to save; call customise() first")
    folder = Path(folder)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
    meta = {"format": FORMAT, "k_blocks": len(gated_blocks(model)), "gates": gates(model),
            "n_params": int(sum(v.numel() for v in state.values())), **(extra or {})}
    atomic_write_bytes(save(state), folder / WEIGHTS_FILE)
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return folder


def read_gated_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: no REACT gated-block metadata; has react-train run?") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: corrupt JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_gated(clip_model: nn.Module, folder: str | Path, *, model_id: str | None = None,
               inplace: bool = False) -> nn.Module:
    """Customise ``clip_model`` as recorded in ``folder`` and load the saved gated weights.

    ``model_id``: the base model's ``LoadedClip.model_id``; refused (MismatchError) when the
    folder records another one."""
    from safetensors.torch import load_file

    meta = read_gated_meta(folder)
    if model_id is not None and meta.get("model_id") not in (None, model_id):
        raise MismatchError(f"{folder}: gated blocks trained on {meta['model_id']!r}, "
                            f"not on {model_id!r}")
    model = customise(clip_model, int(meta["k_blocks"]), init="random", inplace=inplace)
    params = trainable_parameters(model)
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file not found") from exc
    if set(state) != set(params):
        raise FormatError(f"{path}: parameters {sorted(set(state) ^ set(params))[:4]} do not "
                          f"match the customised model")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise FormatError(f"{path}: {name} has shape {tuple(state[name].shape)}, "
                                  f"expected {tuple(p.shape)}")
            p.copy_(state[name].to(p.dtype))
    return model
