"""Config of evaluation."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalConfig:
    modes: tuple[str, ...] = ("off", "image", "text", "both")
    k: int | None = None               # neighbours at inference (None: as trained)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    batch_size: int = 256


PRESETS = {"tiny": EvalConfig(), "demo": EvalConfig()}
