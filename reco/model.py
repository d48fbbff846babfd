"""The drop-in reco model: a frozen open_clip model + an external memory + trained fusion heads.

:class:`RecoModel` exposes ``encode_image(images, normalize=False)`` and
``encode_text(tokens, normalize=False)`` with open_clip's contract, so code written for an
open_clip model (LAION's CLIP_benchmark, for one) evaluates it unchanged. For each side turned on
by the inference ``mode`` the CLIP embedding is refined by RECO's fusion head over the ``k``
memory items retrieved for it:

* ``off``   plain CLIP (bit-identical to the wrapped model);
* ``image`` v-bar = phi_image(v, context(v)) only;
* ``text``  t-bar = phi_text(t, context(t)) only;
* ``both``  v-bar and t-bar.

Which context each side fuses (e.g. ``v_img_txt``: search memory images, fuse their texts) and
the fusion type come from the heads' training config. ``fuse_image_embeddings`` /
``fuse_text_embeddings`` refine precomputed CLIP embeddings (how evaluation runs fast).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reco.errors import ConfigError, FormatError, MismatchError
from reco.evaluation.config import INFERENCE_MODES
from reco.formats import parse_field

SIDES = {"off": (), "image": ("image",), "text": ("text",), "both": ("image", "text")}
_QUERY = {"image": "v", "text": "t"}
_DEFAULT_CONTEXT = {"image": "v_img_txt", "text": "t_txt_img"}


def train_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The training config recorded in the heads' meta (``meta["train"]``, a TrainConfig dict)."""
    value = meta.get("train")
    return dict(value) if isinstance(value, Mapping) else {}


class RecoModel(nn.Module):
    """Frozen CLIP + memory + fusion heads, with open_clip's encode_image/encode_text.

    Args:
        clip: the :class:`reco.clip.LoadedClip` the memory and heads were built with.
        memory: a :class:`reco.index.memory.Memory` (replaceable later: ``model.memory = m``).
        heads: ``{"image": module, "text": module}`` (either may be missing), each mapping
            ``(query (B,d), context (B,k,d)) -> (B,d)`` L2-normalised.
        meta: the heads' meta (training config, dim, k, model_id).
        mode: inference mode, one of ``off``, ``image``, ``text``, ``both``.
        k: neighbours retrieved at inference (None: the k the heads were trained with).
        batch_size: queries per memory search.
    """

    def __init__(self, clip, memory, heads: Mapping[str, nn.Module], meta: Mapping[str, Any], *,
                 mode: str = "both", k: int | None = None, batch_size: int = 4096):
        super().__init__()
        self.loaded_clip = clip
        self.clip_model = clip.model
        self.heads = nn.ModuleDict(dict(heads))
        self.meta = dict(meta)
        settings = train_settings(self.meta)
        self.fusion = str(settings.get("fusion", "transformer"))
        self.contexts = {side: str(settings.get(f"{side}_context", _DEFAULT_CONTEXT[side]))
                         for side in ("image", "text")}
        for side, name in self.contexts.items():
            if parse_field(name)[0] != _QUERY[side]:
                raise FormatError(f"heads meta: {side}_context={name!r} does not start with "
                                  f"{_QUERY[side]!r}")
        self.train_k = int(self.meta.get("k") or settings.get("k") or 10)
        self.batch_size = int(batch_size)
        self._check_heads_model()
        self._memory = None
        self.memory = memory
        self.k = k
        self.mode = mode

    # ---------------------------------------------------------------------------------------
    # settings
    # ---------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.loaded_clip.model_id

    @property
    def preprocess(self):
        return self.loaded_clip.preprocess

    @property
    def tokenizer(self):
        return self.loaded_clip.tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip_model.logit_scale

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in INFERENCE_MODES:
            raise ConfigError(f"mode {value!r}: choose one of {', '.join(INFERENCE_MODES)}")
        missing = [s for s in SIDES[value] if s not in self.heads]
        if missing:
            raise ConfigError(f"mode {value!r} needs the {missing[0]} head, but these heads were "
                              f"trained without it (fuse_{missing[0]}=False); available modes: "
                              f"{', '.join(self.available_modes())}")
        self._mode = value

    def available_modes(self) -> list[str]:
        return [m for m in INFERENCE_MODES if all(s in self.heads for s in SIDES[m])]

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int | None) -> None:
        value = self.train_k if value is None else int(value)
        if value < 1:
            raise ConfigError(f"k={value}: neighbours at inference must be >= 1")
        self._k = value

    @property
    def memory(self):
        return self._memory

    @memory.setter
    def memory(self, memory) -> None:
        """Swap the memory (e.g. a larger one than at training); it must come from the same
        CLIP model (``model_id``) and have the embedding dimension of the heads."""
        if memory.model_id != self.model_id:
            raise MismatchError(f"memory built with model {memory.model_id!r}, but this model "
                                f"uses {self.model_id!r}")
        dim = int(self.meta.get("dim") or self.loaded_clip.embed_dim)
        if int(memory.dim) != dim:
            raise MismatchError(f"memory has dimension {memory.dim}, the heads expect {dim}")
        self._memory = memory

    def _check_heads_model(self) -> None:
        trained = self.meta.get("model_id")
        if trained and trained != self.model_id:
            (arch, was), (now_arch, now) = trained.partition("|")[::2], self.model_id.partition("|")[::2]
            if arch == now_arch and was.startswith("sha256:") and now.startswith("sha256:"):
                raise MismatchError(f"the weights of CLIP model {arch!r} changed: the heads were "
                                    f"trained on embeddings of weights {was[:19]}, the loaded "
                                    f"weights are {now[:19]} (base-CLIP weights replaced?); "
                                    f"rerun the chain from `reco embed-memory --force`")
            raise MismatchError(f"heads trained on embeddings of {trained!r}, but the CLIP model "
                                f"is {self.model_id!r}")

    # ---------------------------------------------------------------------------------------
    # fusion on embeddings
    # ---------------------------------------------------------------------------------------
    def context(self, side: str, queries: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Memory context (B, k, d) of L2-normalised queries for one side."""
        q = queries.detach().float().cpu().numpy()
        ctx = self.memory.context(np.ascontiguousarray(q, dtype=np.float32), self.contexts[side],
                                  int(k or self.k))
        return torch.from_numpy(np.ascontiguousarray(ctx, dtype=np.float32)).to(queries.device)

    def _fuse(self, side: str, x):
        as_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(np.asarray(x, dtype=np.float32)) if as_numpy else x
        q = F.normalize(t.float(), dim=-1)
        head = self.heads[side]
        outs = []
        for start in range(0, q.shape[0], self.batch_size):
            qb = q[start:start + self.batch_size]
            outs.append(head(qb, self.context(side, qb)).float())
        out = torch.cat(outs) if outs else q.new_zeros(q.shape)
        return out.detach().cpu().numpy() if as_numpy else out

    def fuse_image_embeddings(self, v):
        """v-bar for CLIP image embeddings ``v`` (n, d) (tensor or array; normalised here)."""
        return self._fuse("image", v)

    def fuse_text_embeddings(self, t):
        """t-bar for CLIP text embeddings ``t`` (n, d) (tensor or array; normalised here)."""
        return self._fuse("text", t)

    def refine(self, side: str, x):
        """The embedding the current mode gives for precomputed CLIP embeddings ``x``:
        fused for the sides the mode turns on, else x unchanged."""
        return self._fuse(side, x) if side in SIDES[self.mode] else x

    # ---------------------------------------------------------------------------------------
    # open_clip contract
    # ---------------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.clip_model.encode_image(image, normalize=normalize)
        if "image" not in SIDES[self.mode]:
            return features
        return self._fuse("image", features).to(features.dtype)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.clip_model.encode_text(text, normalize=normalize)
        if "text" not in SIDES[self.mode]:
            return features
        return self._fuse("text", features).to(features.dtype)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """Like open_clip's CLIP.forward: (image features, text features, logit scale)."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        return img, txt, self.clip_model.logit_scale.exp()

    # ---------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, *, heads_dir: str | Path | None = None,
                    memory_dir: str | Path | None = None, mode: str = "both",
                    k: int | None = None) -> "RecoModel":
        """Model of a run configuration: its CLIP, its memory index (or ``memory_dir``) and its
        heads (or ``heads_dir``)."""
        from reco.clip import load_clip, resolve_model_spec
        from reco.index.memory import Memory
        from reco.trainer.checkpoint import load_heads

        heads, meta = load_heads(Path(heads_dir or cfg.paths.heads))
        model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
        clip = load_clip(model, pretrained, device=cfg.clip.device, precision=cfg.clip.precision)
        memory = Memory.load(Path(memory_dir or cfg.paths.index), mmap=cfg.index.mmap)
        return cls(clip, memory, heads, meta, mode=mode, k=k,
                   batch_size=max(1, cfg.eval.batch_size * 16)).to(cfg.clip.device)

    @classmethod
    def load(cls, path: str | Path, mode: str = "both", k: int | None = None,
             memory_dir: str | Path | None = None, device: str = "cpu") -> "RecoModel":
        """Everything in one call from a work directory or a heads folder (``heads.json``).

        The CLIP model and memory come from what the heads recorded (``clip``: the model spec,
        a ``local-dir:`` base CLIP relative to the heads folder; ``memory``: the index folder,
        relative to it), or else from the work directory's layout: a run moved or copied
        anywhere loads from any working directory. The CLIP's identity (its weights' digest)
        must be the one the heads were trained on."""
        from reco.clip import load_clip
        from reco.index.memory import Memory
        from reco.trainer.checkpoint import load_heads

        heads_dir = _find_heads_dir(Path(path))
        heads, meta = load_heads(heads_dir)
        model, pretrained, mem = _model_and_memory(heads_dir, meta)
        clip = load_clip(model, pretrained, device=device)
        memory = Memory.load(Path(memory_dir or mem))
        return cls(clip, memory, heads, meta, mode=mode, k=k).to(device)

    from_pretrained = load               # the hub-style name: RecoModel.from_pretrained(folder)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the heads as a self-contained folder (``heads.safetensors`` + ``heads.json``
        with the CLIP spec and memory folder relative to it) that :meth:`from_pretrained`
        loads."""
        from reco.clip import relative_spec
        from reco.trainer.checkpoint import save_heads

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.meta.items() if k != "sides"}
        meta["clip"] = relative_spec(self.loaded_clip.name, self.loaded_clip.pretrained or None, folder)
        source = getattr(self.memory, "folder", None)
        meta["memory"] = os.path.relpath(Path(source).resolve(), folder.resolve()) if source else None
        save_heads(folder, dict(self.heads), meta)
        return folder


def load_model(path: str | Path, mode: str = "both", k: int | None = None,
               memory_dir: str | Path | None = None, device: str = "cpu") -> RecoModel:
    """``reco.load_model(workdir_or_heads_dir)``: see :meth:`RecoModel.load`."""
    return RecoModel.load(path, mode=mode, k=k, memory_dir=memory_dir, device=device)


def _model_from_identity(model_id: str, workdir: Path) -> tuple[str, str | None]:
    """A hub model is named by its identity (``name|tag``; heads of older versions recorded
    ``local-dir:/path|`` the same way); local weights (``arch|sha256:...``) are the run's
    ``base_clip`` folder when its weights have that digest; else ("", None)."""
    from reco.clip import CONFIG_FILE, LOCAL_DIR, model_identity

    name, _, tag = model_id.partition("|")
    if not tag.startswith("sha256:"):
        return name, tag or None
    base = workdir / "base_clip"
    if (base / CONFIG_FILE).is_file() and model_identity(LOCAL_DIR + str(base)) == model_id:
        return LOCAL_DIR + str(base), None
    return "", None


def _find_heads_dir(path: Path) -> Path:
    for cand in (path, path / "heads"):
        if (cand / "heads.json").is_file():
            return cand
    raise FormatError(f"{path}: no heads.json here or in {path / 'heads'}; has `reco train` run?")


def _model_and_memory(heads_dir: Path, meta: Mapping[str, Any]) -> tuple[str, str | None, Path]:
    """(model, pretrained, memory folder) for heads: the spec and memory recorded in the meta
    (relative to the heads folder), else the work directory (the heads folder's parent) and its
    ``config.yaml``, read relative to that folder, never to the current directory."""
    from reco.clip import resolve_model_spec, spec_from

    workdir = heads_dir.parent
    clip = meta.get("clip")
    real = heads_dir.resolve()          # a symlinked heads folder: paths recorded beside the real one
    model, pretrained = spec_from(clip, real) if isinstance(clip, Mapping) else ("", None)
    if not model:
        from reco.config_tree import load_recorded

        cfg = load_recorded(workdir)
        if cfg is not None:
            model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained,
                                                   workdir / "base_clip")
    if not model:
        model, pretrained = _model_from_identity(str(meta.get("model_id") or ""), workdir)
    if not model:
        raise FormatError(f"{heads_dir / 'heads.json'}: no CLIP spec recorded and no config.yaml "
                          f"in {workdir}; pass the model explicitly (RecoModel.from_config)")
    memory = meta.get("memory")           # relative to the (real) heads folder
    return model, (pretrained or None), (real / memory if memory else workdir / "index")

