"""``ReactModel``: a REACT-customised CLIP that drops in where an open_clip model is used.

    model = ReactModel.load("runs/tiny/react/model")
    img = model.encode_image(model.preprocess(pil).unsqueeze(0), normalize=True)
    txt = model.encode_text(model.tokenizer(["a photo of a ..."]), normalize=True)

The folder holds only the gated blocks (``gated.safetensors`` + ``gated.json``); ``gated.json``
names the base CLIP (``base_model`` / ``base_pretrained``), which is loaded and customised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from reco.errors import MismatchError


class ReactModel(nn.Module):
    """open_clip-like: ``encode_image``, ``encode_text``, ``forward``, ``logit_scale``,
    plus ``preprocess`` and ``tokenizer`` attributes."""

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.model.eval()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def model_id(self) -> str:
        return f"react[{self.meta.get('model_id', '')}]"

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        return img, txt, self.logit_scale.exp()

    @classmethod
    def load(cls, folder: str | Path, *, clip=None, device: str = "cpu",
             base_model: str | None = None, base_pretrained: str | None = None) -> "ReactModel":
        """Load the base CLIP named in ``folder/gated.json`` and apply the saved gated blocks.

        Args:
            folder: a react-train output folder.
            clip: an already loaded base ``LoadedClip`` to customise (a copy is customised).
            device: torch device for a base CLIP loaded here.
            base_model / base_pretrained: load this base instead of the recorded one (e.g. the
                work directory moved); its model id must still match.
        """
        from reco.clip import load_clip
        from reco.react.gated import load_gated, read_gated_meta

        meta = read_gated_meta(folder)
        if clip is None:
            clip = load_clip(base_model or meta["base_model"],
                             base_pretrained if base_model else (meta.get("base_pretrained") or None),
                             device=device)
            if base_model is None and clip.model_id != meta["model_id"]:
                raise MismatchError(f"{folder}: trained on {meta['model_id']!r}, loaded {clip.model_id!r}")
        elif clip.model_id != meta.get("model_id", clip.model_id):
            raise MismatchError(f"{folder}: gated blocks trained on {meta['model_id']!r}, "
                                f"not on {clip.model_id!r}")
        model = load_gated(clip.model, folder)
        return cls(model, clip.preprocess, clip.tokenizer, meta)
